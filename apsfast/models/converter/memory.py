"""What a converted supernet will hold, known before any of it is allocated.

Each searched layer holds a meta-weight (its meta widths times the kernel) and one transform
per candidate on each searched side (``meta width × candidate width``). The meta-weight grows
by the meta width's factor per side (``Σ widths / widest``, 2.25 for the ratios 0.5, 0.75, 1 at
``meta_width="sum"``; 1 at ``"widest"``); the transforms are quadratic in the width of their
side, so where a layer's weight is thin for its width (1×1 expansions, depthwise convs,
squeeze-excitation) they outweigh it, and a layer that reads a concatenation of searched groups
has one candidate per *total* width of the segments. :func:`check_fits` adds it all up, with
the gradients of a training step and the model with its traced copy, and refuses
a supernet the budget cannot hold before the first tensor is made, naming the layers that
dominate, a ``meta_width=`` and the blocks to ``exclude=`` that fit.

The budget is stated, not guessed from the moment: the process's address-space limit
(``ulimit -v``) where one is set, less what the process already maps; else the memory the
system has available (``MemAvailable``).
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

from apsfast.models.converter.groups import Analysis, LayerPlan, layout_widths
from apsfast.models.meta_width import meta_width_of

#: The share of the budget convert plans to fill: the rest is for a step's activations, the
#: temporaries of building a layer, and the allocator's slack.
USABLE_FRACTION = 0.8


def _address_space_limit() -> int:
    """The process's address-space limit in bytes, ``-1`` where none is set."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    return -1 if limit in (-1, getattr(resource, "RLIM_INFINITY", -1)) else limit


def available_bytes() -> tuple[int, str]:
    """``(bytes, where from)``: what this process may still allocate: under an address-space
    limit (``ulimit -v``), the limit less what it maps now (``VmSize``) — the same whatever
    else the machine is doing; without one, the system's ``MemAvailable`` (else its free
    pages)."""
    limit = _address_space_limit()
    if limit != -1:
        try:
            with open("/proc/self/status") as status:
                used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        except (OSError, StopIteration):
            used = 0
        return max(limit - used, 0), f"the {limit / 2**30:.1f} GiB address-space limit (ulimit -v) leaves"
    free = None
    try:
        with open("/proc/meminfo") as info:
            free = next((int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return free, "this machine has available"


def _side(widths: Sequence[int], sharing: str, meta_width: Union[str, float]) -> tuple[int, int]:
    """(meta width, elements of the side's transforms) of one side."""
    meta = meta_width_of(widths, sharing, meta_width) or max(widths)
    return meta, (meta * sum(widths) if len(widths) > 1 else 0)


def layer_elements(plan: LayerPlan, kernel: int, ins: Sequence[int], outs: Sequence[int], sharing: str,
                   meta_width: Union[str, float]) -> tuple[int, int]:
    """``(parameters, transforms)``: elements of the APS layer made for ``plan`` (``kernel``:
    elements of one kernel position set, ``kh·kw``; 1 for a linear layer)."""
    if plan.kind == "bn":
        return 4 * sum(ins), 0  # weight, bias and statistics per candidate
    if plan.kind == "grouped":
        g = plan.groups
        part = [w // g for w in ins], [w // g for w in outs]
        meta_in, q = _side(part[0], sharing, meta_width)
        meta_out, p = _side(part[1], sharing, meta_width)
        return g * meta_in * meta_out * kernel, g * (q + p)
    if plan.kind == "depthwise":
        meta_out, p = _side(outs, sharing, meta_width)
        return meta_out * kernel, p
    meta_in, q = _side(ins, sharing, meta_width)
    meta_out, p = _side(outs, sharing, meta_width)
    return meta_in * meta_out * kernel, q + p


def supernet_layers(module: fx.GraphModule, analysis: Analysis, candidates: dict[int, tuple[int, ...]],
                    sharing: str, meta_width: Union[str, float]) -> list[tuple[int, LayerPlan, int]]:
    """``(elements, plan, input candidates)`` of every layer the supernet will replace; the
    elements count its parameters twice (their gradients in a training step) and its transforms."""
    found = []
    for plan in analysis.layers:
        ins = layout_widths(plan.inputs, analysis.groups, candidates)
        outs = layout_widths(plan.outputs, analysis.groups, candidates)
        if len(ins) == 1 and len(outs) == 1:
            continue
        weight = getattr(module.get_submodule(plan.path), "weight", None)
        kernel = math.prod(plan.out_hw) if plan.kind == "flat_linear" else \
            (math.prod(weight.shape[2:]) if weight is not None and weight.dim() > 2 else 1)
        parameters, transforms = layer_elements(plan, kernel, ins, outs, sharing, meta_width)
        found.append((2 * parameters + transforms, plan, len(ins)))
    return found


def check_fits(module: fx.GraphModule, analysis: Analysis, candidates: dict[int, tuple[int, ...]], sharing: str,
               meta_width: Union[str, float], element_size: int, name: str) -> int:
    """The bytes a training step of the supernet will peak at, about: its APS layers, their
    parameters' gradients, the model with its traced copy, and the gradients of the layers kept
    plain. Raises ``ValueError`` before any
    of it is allocated when that is more than :data:`USABLE_FRACTION` of :func:`available_bytes`."""
    layers = supernet_layers(module, analysis, candidates, sharing, meta_width)
    total = sum(p.numel() for p in module.parameters())
    replaced = sum(p.numel() for _, plan, _ in layers for p in module.get_submodule(plan.path).parameters())
    # The model and its traced copy, and the gradients of the layers kept plain.
    model = element_size * (2 * total + total - replaced)
    needed = model + element_size * sum(n for n, _, _ in layers)
    free, source = available_bytes()
    budget = int(USABLE_FRACTION * free)
    if needed <= budget:
        return needed
    options = []
    for option in ("widest",) if meta_width != "widest" and sharing != "independent" else ():
        other = model + element_size * sum(n for n, _, _ in supernet_layers(module, analysis, candidates, sharing,
                                                                             option))
        options.append(f"meta_width={option!r} would take {other / 2**30:.1f} GiB"
                       + ("" if other <= budget else " (too much as well)"))
    ranked = sorted(layers, key=lambda row: -row[0])
    worst = ", ".join(f"{plan.path!r} ({n * element_size / 2**30:.2f} GiB, {count} input widths)"
                      for n, plan, count in ranked[:3])
    blocks: dict[str, int] = {}  # the blocks (two levels down) of the layers, by what they hold
    for n, plan, _ in layers:
        block = ".".join(plan.path.split(".")[:2])
        blocks[block] = blocks.get(block, 0) + n * element_size
    excluded, freed = [], 0
    for block, held in sorted(blocks.items(), key=lambda item: -item[1]):
        if needed - freed <= budget:
            break
        excluded.append(block)
        freed += held
    raise ValueError(
        f"convert: the supernet of {name} would take {needed / 2**30:.1f} GiB at the peak of a training step "
        f"(its APS layers, the model and its traced copy, and the gradients of a step), more than "
        f"{USABLE_FRACTION:.0%} of the {free / 2**30:.1f} GiB {source}; the largest layers: {worst}; "
        + ("; ".join(options) + "; " if options else "")
        + f"or pass exclude={sorted(excluded)} to keep those blocks fixed")
