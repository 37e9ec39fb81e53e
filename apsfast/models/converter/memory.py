"""What a converted supernet will hold, known before any of it is allocated.

Each searched layer holds a meta-weight (its meta widths times the kernel) and one transform
per candidate on each searched side (``meta width × candidate width``). For a plain conv the
meta width's factor over the original (``Σ widths / widest`` per side, 2.25 for the ratios
0.5, 0.75, 1) is the whole story; a layer that reads a concatenation of many searched groups
(DenseNet, Inception-style blocks) has one candidate per *total* width of the segments, and
its transforms grow with their number. :func:`check_fits` adds it all up and refuses a
supernet that the machine's memory cannot hold, before the first tensor is made, naming the
layers that dominate and a ``meta_width=`` that fits where one does.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Union

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover
    resource = None  # type: ignore[assignment]

from torch import fx

from apsfast.models.converter.channels import Analysis, LayerPlan
from apsfast.models.converter.groups import layout_widths
from apsfast.models.meta_width import meta_width_of

# Leave room for the model, the activations of a step and the optimiser's state.
USABLE_FRACTION = 0.5


def available_bytes() -> int:
    """Memory this process can still get: the system's ``MemAvailable`` (else its free pages),
    and no more than its address-space limit (``ulimit -v``) leaves."""
    free = None
    try:
        with open("/proc/meminfo") as info:
            free = next((int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
        try:
            with open("/proc/self/status") as status:
                used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        except (OSError, StopIteration):
            used = 0
        free = min(free, max(limit - used, 0))
    return free


def _side(widths: Sequence[int], sharing: str, meta_width: Union[str, float]) -> tuple[int, int]:
    """(meta width, elements of the side's transforms) of one side."""
    meta = meta_width_of(widths, sharing, meta_width) or max(widths)
    return meta, (meta * sum(widths) if len(widths) > 1 else 0)


def layer_elements(plan: LayerPlan, kernel: int, ins: Sequence[int], outs: Sequence[int], sharing: str,
                   meta_width: Union[str, float]) -> int:
    """Elements of the parameters and transforms of the APS layer made for ``plan``
    (``kernel``: elements of one kernel position set, ``kh·kw``; 1 for a linear layer)."""
    if plan.kind == "bn":
        return 4 * sum(ins)  # weight, bias and statistics per candidate
    if plan.kind == "grouped":
        g = plan.groups
        part = [w // g for w in ins], [w // g for w in outs]
        meta_in, q = _side(part[0], sharing, meta_width)
        meta_out, p = _side(part[1], sharing, meta_width)
        return g * (meta_in * meta_out * kernel + q + p)
    if plan.kind == "depthwise":
        meta_out, p = _side(outs, sharing, meta_width)
        return meta_out * kernel + p
    meta_in, q = _side(ins, sharing, meta_width)
    meta_out, p = _side(outs, sharing, meta_width)
    return meta_in * meta_out * kernel + q + p


def supernet_layers(module: fx.GraphModule, analysis: Analysis, candidates: dict[int, tuple[int, ...]],
                    sharing: str, meta_width: Union[str, float]) -> list[tuple[int, LayerPlan, int]]:
    """``(elements, plan, input candidates)`` of every layer the supernet will replace."""
    found = []
    for plan in analysis.layers:
        ins = layout_widths(plan.inputs, analysis.groups, candidates)
        outs = layout_widths(plan.outputs, analysis.groups, candidates)
        if len(ins) == 1 and len(outs) == 1:
            continue
        weight = getattr(module.get_submodule(plan.path), "weight", None)
        kernel = math.prod(plan.out_hw) if plan.kind == "flat_linear" else \
            (math.prod(weight.shape[2:]) if weight is not None and weight.dim() > 2 else 1)
        found.append((layer_elements(plan, kernel, ins, outs, sharing, meta_width), plan, len(ins)))
    return found


def check_fits(module: fx.GraphModule, analysis: Analysis, candidates: dict[int, tuple[int, ...]], sharing: str,
               meta_width: Union[str, float], element_size: int, name: str) -> int:
    """The bytes the supernet's APS layers will take; raises ``ValueError`` before any is
    allocated when that is more than :data:`USABLE_FRACTION` of :func:`available_bytes`."""
    layers = supernet_layers(module, analysis, candidates, sharing, meta_width)
    needed = element_size * sum(n for n, _, _ in layers)
    budget = int(USABLE_FRACTION * available_bytes())
    if needed <= budget:
        return needed
    options = []
    for option in ("widest",) if meta_width != "widest" and sharing != "independent" else ():
        other = element_size * sum(n for n, _, _ in supernet_layers(module, analysis, candidates, sharing, option))
        options.append(f"meta_width={option!r} would take {other / 2**30:.1f} GiB"
                       + ("" if other <= budget else " (too much as well)"))
    ranked = sorted(layers, key=lambda row: -row[0])
    worst = ", ".join(f"{plan.path!r} ({n * element_size / 2**30:.1f} GiB, {count} input widths)"
                      for n, plan, count in ranked[:3])
    blocks: set[str] = set()  # the blocks (two levels down) of the layers that hold 90% of it
    held = 0
    for n, plan, _ in ranked:
        if held >= 0.9 * needed / element_size:
            break
        blocks.add(".".join(plan.path.split(".")[:2]))
        held += n
    raise ValueError(
        f"convert: the supernet of {name} would take {needed / 2**30:.1f} GiB for its APS layers, more than "
        f"{USABLE_FRACTION:.0%} of the {budget / USABLE_FRACTION / 2**30:.1f} GiB this machine has free; the "
        f"largest: {worst} (a layer reading a concatenation of many searched groups has one input transform "
        f"per total width); " + ("; ".join(options) + "; " if options else "")
        + f"or pass exclude={sorted(blocks)} to keep those blocks fixed")
