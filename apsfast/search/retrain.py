"""Training a searched architecture from scratch: the export of the chosen arch, freshly
initialised, trained on the whole train split and scored on the test split (which the search
never sees). Checkpointed every epoch, so a stopped run resumes."""
from __future__ import annotations

import json
import math
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from apsfast import data as datasets
from apsfast import models
from apsfast.models.static import reinitialise
from apsfast.search.checkpoint import load_checkpoint, save_checkpoint
from apsfast.search.config import Config, ConfigError, apply_overrides, config_from_dict
from apsfast.search.distributed import resolve_device
from apsfast.search.loop import RESULT, _write_json, load_data
from apsfast.search.metrics import MetricsLog

CHECKPOINT, METRICS, SUMMARY, MODEL = "checkpoint.pt", "metrics.jsonl", "retrain.json", "retrained.pt"


def read_result(path: Union[str, Path]) -> tuple[dict[str, Any], Path]:
    """A search's ``result.json`` (``path`` is the file or the search's folder) and its path."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT
    if not path.is_file():
        raise FileNotFoundError(f"no search result at {str(path)!r}: pass a search's output folder or its "
                                f"result.json")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    for key in ("model", "options", "chosen", "config"):
        if key not in result:
            raise ValueError(f"{str(path)!r} is not an apsfast search result: it lacks {key!r}")
    return result, path


def fresh_model(result: dict[str, Any], device: Union[str, torch.device]) -> nn.Sequential:
    """The chosen arch of ``result`` as a static network, freshly initialised on ``device``
    (built through the meta device, so the supernet never takes memory)."""
    net = models.build(result["model"], device="meta", **result["options"])
    arch = net.arch_from_json(result["chosen"])
    return reinitialise(net.export(arch, inherit_weights=False).to_empty(device=device))


def _accuracy(model: nn.Module, data: datasets.ImageSet, batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in data.batches(batch_size, seed=0, epoch=0, shuffle=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return correct / seen


def retrain(result_path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
            overrides: Sequence[str] = (), *, resume: bool = False,
            log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Train the arch of a search result from scratch and report its test accuracy.

    Args:
        result_path: the search's output folder or its ``result.json``.
        out_dir: where to write (default: ``retrain/`` beside the result).
        overrides: ``"retrain.epochs=5"``-style config overrides (any section may be given;
            the data and the run sections apply too).
        resume: continue from ``out_dir/checkpoint.pt``.

    Returns:
        The summary also written to ``retrain.json``: test accuracy, epochs, MACs, params.
    """
    log = log or (lambda text: print(text, flush=True))
    result, path = read_result(result_path)
    config: Config = apply_overrides(config_from_dict(result["config"]), overrides)
    out = Path(out_dir) if out_dir is not None else path.parent / "retrain"
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(f"{str(out)!r} already holds a retraining run: pass --resume or another --out")
    cfg, run = config.retrain, config.run
    device = resolve_device(run.device)
    train_set, test_set = load_data(config)
    if train_set.num_classes != result["num_classes"]:
        raise ConfigError(f"the data has {train_set.num_classes} classes, the searched model {result['num_classes']}")
    torch.manual_seed(run.seed)
    model = fresh_model(result, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    batches = train_set.num_batches(cfg.batch_size, drop_last=True)
    if batches == 0:
        raise ConfigError(f"retrain.batch_size = {cfg.batch_size} exceeds the train split ({len(train_set)} images)")
    steps = min(batches, cfg.steps_per_epoch or batches)
    expect = {"kind": "retrain", "model": result["model"], "arch": list(result["chosen"]["arch"]),
              "config": config.digest()}
    metrics = MetricsLog(out / METRICS)
    epoch = 0
    if (out / CHECKPOINT).exists():
        state = load_checkpoint(out / CHECKPOINT, expect=expect)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        metrics.truncate(state["metrics_offset"])
        epoch = state["epoch"]
        log(f"resumed retraining from {out / CHECKPOINT} at epoch {epoch + 1}")
    else:
        metrics.truncate(0)
    flops, params = result["chosen"]["flops"], result["chosen"]["params"]
    log(f"retraining {result['model']} ({flops / 1e6:.2f}M MACs, {params:,} params) from scratch for "
        f"{cfg.epochs} epochs of {steps} steps on {config.data.name}, on {device}; output in {out}")
    from tqdm.auto import tqdm
    test_acc = float("nan")
    while epoch < cfg.epochs:
        model.train()
        started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"retrain {epoch + 1}/{cfg.epochs}", disable=None if run.progress else True,
                   leave=False, file=sys.stderr)  # disable=None: a bar only where stderr is a terminal
        for b, (x, y) in enumerate(islice(train_set.batches(cfg.batch_size, seed=run.seed + 7, epoch=epoch,
                                                            augment=True, drop_last=True), steps)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:  # cosine over all steps
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + b) / (cfg.epochs * steps)))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the retraining loss is {float(loss)} at epoch {epoch + 1}; the last "
                                         f"good checkpoint is {out / CHECKPOINT}. Lower retrain.lr and --resume")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        test_acc = _accuracy(model, test_set, cfg.batch_size, device)
        record = {"kind": "epoch", "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "test_acc": test_acc, "seconds": time.perf_counter() - started}
        metrics.write(record)
        log(f"retrain epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  train acc "
            f"{record['train_acc']:.2%}  test acc {test_acc:.2%}  ({record['seconds']:.1f} s)")
        epoch += 1
        save_checkpoint(out / CHECKPOINT, {**expect, "epoch": epoch, "model_state": model.state_dict(),
                                           "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                           "metrics_offset": metrics.offset()})
    metrics.close()
    if math.isnan(test_acc):  # resumed after the last epoch: score the saved weights
        test_acc = _accuracy(model, test_set, cfg.batch_size, device)
    save_checkpoint(out / MODEL, {"kind": "exported", "model": result["model"], "options": result["options"],
                                  "arch": list(result["chosen"]["arch"]), "state_dict": model.state_dict()})
    summary = {"model": result["model"], "strategy": result["strategy"], "widths": result["chosen"]["widths"],
               "flops": flops, "params": params, "epochs": cfg.epochs, "test_acc": test_acc,
               "data": config.data.name, "result": str(path)}
    _write_json(out / SUMMARY, summary)
    log(f"test accuracy {test_acc:.2%} after {cfg.epochs} epochs; model: {out / MODEL}; summary: {out / SUMMARY}")
    return summary

