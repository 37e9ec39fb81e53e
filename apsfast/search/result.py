"""The end of a search: the beam of the most likely archs, the choice among them, how sure the
searcher is, ``result.json``, the exported network and the plots; and reading them back."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from apsfast import models
from apsfast.models.registry import CONVERTED
from apsfast.models.static import reinitialise
from apsfast.search.budget import LATENCY, Budget, resolve_budget
from apsfast.search.checkpoint import load_checkpoint, save_checkpoint
from apsfast.search.config import SELECTS
from apsfast.search.metrics import read_metrics
from apsfast.search.portable import input_shape_of, program_entries
from apsfast.search.searchers import Searcher

RESULT, MODEL, CURVES, DECISIONS = "result.json", "model.pt", "curves.png", "decisions.png"
# A policy whose entropy is above this fraction of the uniform maximum has learned next to
# nothing: its most likely arch is close to a random pick.
UNSURE = 0.9
# A chosen arch whose probability is below this fraction of the policy's top arch's is one the
# policy hardly ever picks.
UNLIKELY = 0.01


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def select_arch(candidates: list[dict[str, Any]], target: Optional[float], *, key: str = "flops",
                unit: str = "MACs", rule: str = "likely") -> tuple[int, str]:
    """The candidate (index into the beam, most likely first) that ``rule`` picks under
    ``target``: ``likely``, the most likely within it; ``closest``, the closest to it without
    exceeding it, ties to the more likely. Without a target the most likely; with no candidate
    within it the cheapest. ``key`` is the candidates' cost field (``flops``: MACs;
    ``latency_ms``: predicted milliseconds) and ``unit`` how the messages name it. Returns the
    index and why it was chosen."""
    if rule not in SELECTS:
        raise ValueError(f"rule must be one of {', '.join(SELECTS)}, got {rule!r}")
    if target is None:
        return 0, "the most likely arch (no FLOPs target)"
    under = [i for i, c in enumerate(candidates) if c[key] <= target]
    if under and rule == "likely":
        return under[0], f"the most likely arch of the beam within the target {target:.4g} {unit}"
    if under:
        best = max(under, key=lambda i: (candidates[i][key], candidates[i]["loglik"]))
        return best, f"the arch of the beam closest to the target {target:.4g} {unit} without exceeding it"
    best = min(range(len(candidates)), key=lambda i: (candidates[i][key], -candidates[i]["loglik"]))
    return best, (f"no arch of the beam is within the target {target:.4g} {unit}: the cheapest "
                  f"(raise result.beam or the reward's beta)")


def against_top(candidates: list[dict[str, Any]], index: int, *, key: str = "flops") -> dict[str, Any]:
    """The chosen candidate (``index``) beside the policy's most likely (index 0): their ranks,
    probabilities and costs in a line, and a warning when the chosen one's probability is under
    :data:`UNLIKELY` of the top one's (a pick the policy hardly makes). Empty when they are
    the same arch."""
    if index == 0:
        return {}
    top, chosen = candidates[0], candidates[index]
    ratio = math.exp(chosen["loglik"] - top["loglik"])
    show = (lambda c: f"{c[key]:.4g} ms") if key == "latency_ms" else (lambda c: f"{c[key] / 1e6:.3g}M MACs")
    out: dict[str, Any] = {
        "top_rank": 0, "top_probability": top["probability"], f"top_{key}": top[key], "probability_ratio": ratio,
        "line": f"chosen: rank {index} of the beam, probability {chosen['probability']:.3g}, {show(chosen)}; the "
                f"policy's top arch: rank 0, probability {top['probability']:.3g}, {show(top)}"}
    if ratio < UNLIKELY:
        out["warning"] = (f"the chosen arch's probability is {ratio:.2g} of the policy's top arch's (under "
                          f"{UNLIKELY:.0%}): the policy hardly picks it; result.select=likely takes the most likely "
                          f"within the target, or search longer so that the policy meets the target")
    return out


def argmax_choice(candidates: list[dict[str, Any]], target: Optional[float], *, key: str = "flops",
                  unit: str = "MACs") -> tuple[int, str]:
    """The most likely candidate (index 0), as TAS's and ISTA-NAS's authors export their
    searchers' argmax, and why, with its cost against ``target`` when there is one."""
    if target is None:
        return 0, "the most likely arch (no FLOPs target)"
    cost = candidates[0][key]
    where = "within" if cost <= target else "over"
    return 0, (f"the searcher's most likely arch, as its authors export it ({cost:.4g} {unit}, {where} the target "
               f"{target:.4g} {unit})")


def policy_report(searcher: Searcher) -> dict[str, Any]:
    """The searcher's entropy against its uniform maximum, and a warning when it is near it."""
    entropy, maximum = searcher.policy_entropy()
    fraction = entropy / maximum if maximum > 0 else 0.0
    report = {"entropy": entropy, "max_entropy": maximum, "entropy_fraction": fraction}
    if fraction > UNSURE:
        report["warning"] = (f"the searcher's policy is near uniform (entropy {fraction:.1%} of its maximum): the "
                             f"chosen arch is close to a random pick; search longer, raise controller.lr, or check "
                             f"that the rewards differ between archs")
    return report


def build_result(net: models.Supernet, searcher: Searcher, config, *, data: dict[str, Any], phi: float,
                 budget: Optional[Budget] = None) -> dict:
    """``result.json``'s content: the beam, the chosen arch, its rank in the beam and why, its
    decisions' probabilities, the policy's certainty, Φ and the settings. The choice is the
    searcher's (:attr:`~apsfast.search.searchers.Searcher.exports`): the beam's arch that
    ``result.select`` picks under the target (:func:`select_arch`), or its most likely
    (:func:`argmax_choice`); beside the policy's top arch when they differ (:func:`against_top`,
    ``chosen["top"]``). With a latency
    ``budget`` every candidate also has its predicted ``latency_ms``, and the choice is by that."""
    target = config.reward.flops_target
    budget = resolve_budget(config, net.flops, budget)
    latency = budget.key == "latency_ms"
    candidates = [{"arch": arch, "widths": net.widths(arch), "loglik": loglik, "probability": math.exp(loglik),
                   "flops": net.flops(arch), "params": net.params(arch),
                   **({"latency_ms": budget.cost(arch)} if latency else {})}
                  for arch, loglik in searcher.beam(config.result.beam)]
    if searcher.exports == "argmax":
        index, why = argmax_choice(candidates, budget.target, key=budget.key, unit=budget.unit)
    else:
        index, why = select_arch(candidates, budget.target, key=budget.key, unit=budget.unit,
                                 rule=config.result.select)
    chosen = candidates[index]
    top = against_top(candidates, index, key=budget.key)
    extra: dict[str, Any] = {"latency_target": config.reward.latency_target}
    if latency:
        extra["latency"] = {"batch": budget.table.batch, "device": budget.table.key["device"],
                            "table": LATENCY, "rest_ms": budget.table.rest_ms,
                            "min_latency_ms": budget.cost(net.min_arch()),
                            "max_latency_ms": budget.cost(net.max_arch())}
    decisions = [{"name": d.name, "widths": list(d.widths), "chosen": d.widths[a], "probs": p}
                 for d, a, p in zip(net.decisions(), chosen["arch"], searcher.probabilities(chosen["arch"]))]
    return {"model": net.name, "options": net.options, "strategy": config.sharing.strategy, **data,
            "flops_target": target, **extra,
            "chosen": {**chosen, "rank": index, "why": why, **({"top": top} if top else {})}, "candidates": candidates,
            "decisions": decisions, "policy": policy_report(searcher), "phi": phi,
            "max_flops": net.flops(net.max_arch()), "config": config.to_dict()}


def save_exported(path: Path, net: models.Supernet, arch: list[int], static: nn.Module, *,
                  portable: bool = True) -> None:
    """A static network's weights with what rebuilds it through apsfast (model, options, arch);
    ``portable``: with its input shape and weight-free ``torch.export`` program, which rebuild
    it with torch alone (:mod:`apsfast.search.portable`)."""
    program = program_entries(static, input_shape_of(net)) if portable else {}
    save_checkpoint(path, {"kind": "exported", "model": net.name, "options": net.options, "arch": list(arch),
                           "state_dict": static.state_dict(), **program})


def write_outputs(out: Path, net: models.Supernet, result: dict[str, Any], *, portable: bool = True) -> None:
    """``result.json``, ``model.pt`` (the chosen arch with the supernet's weights) and the plots."""
    arch = result["chosen"]["arch"]
    save_exported(out / MODEL, net, arch, net.export(arch, inherit_weights=True), portable=portable)
    write_json(out / RESULT, result)
    from apsfast.search.plots import plot_curves, plot_decisions
    epochs = read_metrics(out / "metrics.jsonl", kind="epoch")
    title = f"{net.name}, {result['strategy']} sharing"
    plot_curves(epochs, out / CURVES, title=title)
    plot_decisions(epochs, result["decisions"], out / DECISIONS, title=title)


def summary_lines(out: Path, result: dict[str, Any]) -> list[str]:
    """What a finished search says: the choice, and where everything is."""
    chosen = result["chosen"]
    widths = ", ".join(f"{d['name']}={d['chosen']}" for d in result["decisions"])
    latency = f"{chosen['latency_ms']:.4g} ms predicted, " if "latency_ms" in chosen else ""
    lines = [f"chosen ({chosen['why']}): {latency}{chosen['flops'] / 1e6:.2f}M MACs, {chosen['params']:,} params, "
             f"probability {chosen['probability']:.3g}; widths {widths}"]
    top = chosen.get("top", {})
    if top:
        lines.append(top["line"])
    if "warning" in top:
        lines.append(f"warning: {top['warning']}")
    if "warning" in result["policy"]:
        lines.append(f"warning: {result['policy']['warning']}")
    lines.append(f"result: {out / RESULT}; model: {out / MODEL}; plots: {out / CURVES}, {out / DECISIONS}")
    return lines


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


def fresh_model(result: dict[str, Any], arch: list[int], device: Union[str, torch.device]) -> nn.Module:
    """``arch`` of ``result``'s model as a static network, freshly initialised on ``device``
    (built through the meta device, so the supernet never takes memory)."""
    net = models.build(result["model"], device="meta", **result["options"])
    return reinitialise(net.export(net.check_arch(arch), inherit_weights=False).to_empty(device=device))


def load_exported(path: Union[str, Path], device: Union[str, torch.device] = "cpu", *,
                  model: Optional[models.Supernet] = None) -> nn.Module:
    """The static model a search or a retrain exported (``model.pt``), with its weights.
    ``model``: the supernet the search was given (``search(..., model=net)``) where the file's
    model cannot be rebuilt by name (one made by :func:`apsfast.convert` in Python)."""
    state = load_checkpoint(path, expect={"kind": "exported"})
    if model is not None:
        if model.name != state["model"]:
            raise ValueError(f"{str(path)!r} holds {state['model']}, the model passed is {model.name}: pass the "
                             f"supernet the search was given")
        net = model
    elif str(state["model"]).startswith(CONVERTED):
        raise ValueError(f"{str(path)!r} holds {state['model']}, a supernet made by apsfast.convert in Python, which "
                         f"cannot be rebuilt by name: pass it again (load_exported(path, model=net)), or load the "
                         f"file with torch alone: state = torch.load(path, weights_only=True); model = "
                         f"torch.export.load(io.BytesIO(state['program'])).module(); "
                         f"model.load_state_dict(state['state_dict'], assign=True)")
    else:
        net = models.build(state["model"], device="meta", **state["options"])
    static = net.export(state["arch"]).to_empty(device=device)
    static.load_state_dict(state["state_dict"])
    return static
