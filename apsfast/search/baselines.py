"""The retrains a search is judged by: the most likely archs of its beam, each trained from
scratch (the paper's Fig. 8: how much the choice depends on the rank), and the uniformly
scaled network of the standard widths, the baseline at equal MACs (Fig. 9). Both run
:func:`~apsfast.search.retrain.retrain`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from apsfast import models
from apsfast.search import assemble
from apsfast.search.config import Config, ConfigError
from apsfast.search.result import read_result, write_json
from apsfast.search.retrain import describe_arch, retrain

TOP = "top.json"


def _say(log: Optional[Callable[[str], None]]) -> Callable[[str], None]:
    return log or (lambda text: print(text, flush=True))


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def retrain_top(result_path: Union[str, Path], n: int, out_dir: Optional[Union[str, Path]] = None,
                overrides: Sequence[str] = (), *, resume: bool = False,
                log: Optional[Callable[[str], None]] = None, model: Optional[models.Supernet] = None,
                train_data: Any = None, val_data: Any = None) -> dict[str, Any]:
    """Retrain the ``n`` most likely archs of a search's beam (the paper's Fig. 8), each into
    ``OUT/top-k/`` (``OUT``: ``out_dir``, default ``retrain/`` beside the result), and write
    ``OUT/top.json``: every arch's test accuracy, their mean and sample standard deviation.

    ``n`` beyond the beam (``result.json``'s ``candidates``) is refused before any training.
    With ``resume`` each ``top-k`` folder that holds a checkpoint continues from it. ``model``,
    ``train_data`` and ``val_data``: as for :func:`retrain`.
    """
    result, path = read_result(result_path)
    candidates = result.get("candidates") or []
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(candidates):
        raise ConfigError(f"--top must be in 1..{len(candidates)} (the beam of {path} holds {len(candidates)} archs; "
                          f"search with a larger result.beam for more), got {n!r}")
    folder = Path(out_dir) if out_dir is not None else path.parent / "retrain"
    rows = []
    for k, candidate in enumerate(candidates[:n], 1):
        sub = folder / f"top-{k}"
        summary = retrain(path, sub, overrides, resume=resume and (sub / "checkpoint.pt").exists(), log=log,
                          arch=candidate["arch"], model=model, train_data=train_data, val_data=val_data)
        rows.append({"rank": k, "probability": candidate.get("probability"), "arch": candidate["arch"],
                     "widths": candidate["widths"], "flops": candidate["flops"], "params": candidate["params"],
                     "test_acc": summary["test_acc"], "folder": str(sub)})
    accs = [row["test_acc"] for row in rows]
    mean = sum(accs) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    top = {"model": result["model"], "strategy": result["strategy"], "n": n, "mean": mean, "std": std,
           "archs": rows, "result": str(path)}
    if _main_process():
        write_json(folder / TOP, top)
    _say(log)(f"top-{n} archs of the beam: test accuracy {mean:.2%} ± {std:.2%} (mean ± sample std over {n}); "
              f"summary: {folder / TOP}")
    return top


def uniform_arch(net: models.Supernet, ratio: float) -> list[int]:
    """The uniformly scaled network: at every decision the candidate nearest to ``ratio`` × the
    standard network's width there (the narrower on a tie)."""
    standard = net.standard_widths()
    return [min(range(len(d.widths)), key=lambda a: (abs(d.widths[a] - ratio * standard[d.name]), a))
            for d in net.decisions()]


def retrain_uniform(config: Config, ratio: float, out_dir: Union[str, Path], *, resume: bool = False,
                    log: Optional[Callable[[str], None]] = None, source: str = "",
                    model: Optional[models.Supernet] = None, train_data: Any = None,
                    val_data: Any = None) -> dict[str, Any]:
    """Train the uniformly scaled network of ``config``'s model (:func:`uniform_arch`) from
    scratch with the same :class:`Retrain` as a searched arch, into ``out_dir``: the baseline
    a search is compared with at equal MACs (the paper's Fig. 9). ``source`` is how the
    messages name the command that started it; ``model``, ``train_data`` and ``val_data``: the
    supernet and the data sets a search was given in Python, as for :func:`retrain` (the
    uniform network is then ``model``'s). Returns the ``retrain.json`` summary."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
        raise ConfigError(f"--uniform must be a ratio > 0 of the standard widths, got {ratio!r}")
    if model is not None:
        config = assemble.adopt(config, model)
    config, data = assemble.given_data(config, train_data, val_data)
    plan = assemble.check(config, search=False, data=data)
    net = model if model is not None else assemble.build_supernet(config, plan.options, "meta")
    arch = uniform_arch(net, float(ratio))
    result = {"model": net.name, "options": net.options, "strategy": "uniform",
              "num_classes": plan.num_classes, "config": config.to_dict(), "source": source or f"--uniform {ratio:g}",
              "uniform": float(ratio)}
    chosen = describe_arch(result, arch, model)
    standard = net.flops(net.standard_arch())
    widths = ", ".join(f"{name}={w}" for name, w in chosen["widths"].items())
    _say(log)(f"uniform scaling ×{ratio:g} of the standard widths (nearest candidates): {chosen['flops'] / 1e6:.2f}M "
              f"MACs ({chosen['flops'] / standard:.0%} of the standard arch's {standard / 1e6:.2f}M); widths {widths}")
    result["chosen"] = {**chosen, "why": f"uniform scaling ×{ratio:g}"}
    return retrain(result, out_dir, (), resume=resume, log=log, model=model, train_data=train_data,
                   val_data=val_data)
