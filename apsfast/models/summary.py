"""What a search space holds and spans, in numbers: the rows of ``apsfast models``."""
from __future__ import annotations

from typing import Any

from apsfast.models.base import Supernet
from apsfast.models.registry import build
from apsfast.nn import CandidateTransforms


def supernet_size(net: Supernet) -> dict[str, int]:
    """Parameters of the supernet itself: all of them, the transforms P/Q among them, and the
    buffers (per-width batch-norm statistics)."""
    return {"params": sum(p.numel() for p in net.parameters()),
            "transforms": sum(m.matrix.numel() for m in net.modules() if isinstance(m, CandidateTransforms)),
            "buffers": sum(b.numel() for b in net.buffers())}


def summary(name: str, **options: Any) -> dict[str, Any]:
    """The space ``name`` with ``options``: its decisions, candidate sets, the MACs and
    parameters of its min, standard and max architectures, and the size of its supernet under
    the chosen sharing and under ordinal sharing (the smallest meta widths). Built on the meta
    device: nothing is allocated."""
    net = build(name, device="meta", **options)
    sets = list(dict.fromkeys(d.widths for d in net.decisions()))
    archs = {"min": net.min_arch(), "standard": net.standard_arch(), "max": net.max_arch()}
    ordinal = build(name, device="meta", **{**options, "sharing": "ordinal"})
    return {
        "model": name,
        "options": net.options,
        "decisions": len(net.decisions()),
        "candidate_sets": [list(s) for s in sets],
        "flops": {k: net.flops(a) for k, a in archs.items()},
        "params": {k: net.params(a) for k, a in archs.items()},
        "supernet": supernet_size(net),
        "supernet_ordinal": supernet_size(ordinal),
    }


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _braces(widths: list[int]) -> str:
    return "{" + ",".join(map(str, widths)) + "}"


def _sets(row: dict[str, Any]) -> str:
    sets = row["candidate_sets"]
    if len(sets) == 1:
        return f"{_braces(sets[0])} every layer"
    base = row["options"].get("widths")
    base = _braces(base) + " scaled per layer" if isinstance(base, list) else _braces(sets[0]) + " …"
    return f"{base} ({len(sets)} sets, the widest {_braces(max(sets, key=lambda w: w[-1]))})"


def decisions_markdown(name: str, **options: Any) -> str:
    """Every decision of a space: its name, candidates and the standard network's width."""
    net = build(name, device="meta", **options)
    nearest, standard = net.widths(net.standard_arch()), net.standard_widths()
    lines = ["| # | decision | candidate widths | standard width (→ nearest candidate) |", "|---:|---|---|---:|"]
    for k, d in enumerate(net.decisions()):
        shown = f"{standard[d.name]}" + ("" if nearest[d.name] == standard[d.name] else f" → {nearest[d.name]}")
        lines.append(f"| {k} | `{d.name}` | {_braces(list(d.widths))} | {shown} |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of search spaces (docs/search-spaces.md)."""
    lines = ["| model | decisions | candidate widths | MACs min … standard … max | params of the standard arch "
             "| supernet params, APS-T/I (of which P/Q) | APS-O (of which P/Q) |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        flops, size, ordinal = r["flops"], r["supernet"], r["supernet_ordinal"]
        lines.append(f"| `{r['model']}` | {r['decisions']} | {_sets(r)} "
                     f"| {_millions(flops['min'])} … {_millions(flops['standard'])} … {_millions(flops['max'])} "
                     f"| {_millions(r['params']['standard'])} "
                     f"| {_millions(size['params'])} ({_millions(size['transforms'])}) "
                     f"| {_millions(ordinal['params'])} ({_millions(ordinal['transforms'])}) |")
    return "\n".join(lines)
