"""Network-wide operations over every APS layer of a model: Φ, the transition, and the
grouped construction of all candidate kernels of a sampled architecture."""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from apsfast import _checks, ops
from apsfast.functional import construct_grouped
from apsfast.nn.base import APSLayer
from apsfast.sharing import transition_step_all


def aps_layers(module: nn.Module) -> list[APSLayer]:
    """Every APS layer of ``module``, in ``module.modules()`` order. A module that lists its own
    (:meth:`apsfast.models.Supernet.aps_layers`, found once: a walk of a ResNet-20's 280
    modules costs more host time than its transition step) is asked instead of walked."""
    own = getattr(type(module), "aps_layers", None)
    if own is not None:
        return own(module)
    return [m for m in module.modules() if isinstance(m, APSLayer)]


def network_sharing_level(module: nn.Module) -> Tensor:
    """The network's Φ: the sum of its APS layers' (paper eq. 4)."""
    layers = aps_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no APS layer")
    return torch.stack([layer.sharing_level() for layer in layers]).sum()


def network_sharing_floor(module: nn.Module) -> float:
    """A lower bound of the network's Φ over all semi-orthogonal transforms of its meta widths:
    per side ``S ≥ max(n, ½(n²/C + n))`` (``n = Σ c_a``, ``C`` the meta width; ``‖MᵀM‖² ≥ n²/C``
    for unit columns and ``‖M_aᵀM_a‖² ≥ c_a``), multiplied over a layer's sides and summed over
    its layers. With ``C = n`` it is Theorem 3.1's minimum ``Σ c_a``; with a narrower meta width
    the transition lands within about 1% of it (docs/transition-cost.md)."""
    total = 0.0
    for layer in aps_layers(module):
        factor = 1.0
        for widths, meta, side in ((layer.out_widths, layer.meta_out_width, layer.out_transforms),
                                   (layer.in_widths, layer.meta_in_width, layer.in_transforms)):
            if side is not None:
                n = sum(widths)
                factor *= max(n, 0.5 * (n * n / meta + n))
        total += factor
    return total


class _TransitionPlan:
    """A network's transform sides packed once for the batched transition: each side's
    ``matrix`` parameter (its candidates side by side, the layout the op steps in place), its
    candidate widths and its partner. Checked when built (by :func:`apsfast.transition_step_all`
    on the first step); later steps go straight to the op's backend (:func:`apsfast.ops.step_sides`),
    with no per-layer work on the host."""

    def __init__(self, found: list[APSLayer]) -> None:
        self.found = found  # what aps_layers gave: the same list again means the same layers
        self.layers = layers = [layer for layer in found
                                if layer.out_transforms is not None or layer.in_transforms is not None]
        self.sides, self.widths, self.counts, self.partner = [], [], [], []
        for layer in layers:
            present = [s for s in (layer.out_transforms, layer.in_transforms) if s is not None]
            for k, side in enumerate(present):
                self.partner.append(len(self.sides) + (1 - 2 * k) if len(present) == 2 else -1)
                self.sides.append(side)
                self.widths.extend(side.widths)
                self.counts.append(len(side.widths))
        self.stepped: Optional[list[tuple[int, int]]] = None  # the matrices after our last step

    def current(self) -> list[tuple[int, int]]:
        return [(m.data_ptr(), m._version) for m in self.matrices()]

    def matrices(self) -> list[Tensor]:
        return [side._parameters["matrix"] for side in self.sides]  # side.matrix, without the lookup

    def matches(self, found: list[APSLayer]) -> bool:
        return found is self.found or (len(found) == len(self.found)
                                       and all(a is b for a, b in zip(found, self.found)))


_plans: "weakref.WeakKeyDictionary[nn.Module, _TransitionPlan]" = weakref.WeakKeyDictionary()


def network_transition_step(module: nn.Module, tau: float, *, relative: bool = True) -> Tensor:
    """One transition step (eq. 5) of every APS layer of ``module`` in one batched call.

    APS-T layers still at their exact ordinal start are perturbed first (see
    :meth:`APSLayer.begin_transition`); ``relative`` (the default, the search's rate) as in
    :func:`apsfast.transition_step_all`.
    Returns the network's Φ before the step, a 0-d tensor on the transforms' device (nothing
    is read back to the host).

    The layers' sides are packed once per module and reused; they are looked at again only
    when something else has written a transform since the last step (a checkpoint loaded, a
    layer reset), which may have put it back at its exact start.
    """
    found = aps_layers(module)
    plan = _plans.get(module)
    if plan is None or not plan.matches(found):
        plan = _TransitionPlan(found)
        if not plan.layers:
            raise ValueError(f"{type(module).__name__} has no APS layer with candidate transforms")
        _plans[module] = plan
    if plan.stepped != plan.current():
        for layer in plan.layers:
            layer.begin_transition()
        phi = transition_step_all([(layer.P, layer.Q) for layer in plan.layers], tau, relative=relative)
    else:
        tau = _checks.finite_float("tau", tau, positive=True)
        phi = ops.step_sides(plan.matrices(), plan.widths, plan.counts, plan.partner, tau,
                             _checks.flag("relative", relative))
    plan.stepped = [side.mark_transformed() for side in plan.sides]
    return phi


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype autocast would cast a ``dtype`` convolution weight on ``device`` to, or
    ``None`` where it would not (autocast off there, or not a float32 weight)."""
    if dtype != torch.float32 or not torch.amp.is_autocast_available(device.type) \
            or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def prebuild_kernels(items: Sequence[tuple[APSLayer, int]]) -> None:
    """Build the candidate weights of many layers in one grouped call, for their next forward.

    Args:
        items: ``(layer, in_width)`` pairs: each layer's next input width under the sampled
            architecture (its ``active_out`` must already be set). Layers whose weight is a
            free slice (exact selections) are skipped.

    Each prebuilt weight serves the next forward of its layer only, and only if the input and
    output candidates match and the meta-weight has not changed since; otherwise it is
    discarded and the layer builds its own. Gradients reach the meta-weights through the
    grouped backward. Under autocast the kernels are emitted in its dtype (:func:`autocast_dtype`),
    and a channels_last meta-weight gives channels_last kernels: the convolutions take them as
    they are, with no cast or layout copy per layer.
    """
    groups: dict[tuple[torch.dtype, torch.device], list] = {}
    for layer, in_width in items:
        operands = layer.prebuild_operands(in_width)
        if operands is not None:
            groups.setdefault((layer.weight.dtype, layer.weight.device), []).append((layer, operands))
    for (dtype, device), entries in groups.items():
        weights, Ps, Qs = ([op[k] for _, op in entries] for k in (1, 2, 3))
        trained = any(M is not None and M.requires_grad for M in (*Ps, *Qs))
        # Under autocast the kernels come out in its dtype: the convolutions would cast each.
        emit = autocast_dtype(device, dtype)
        # The operands are the layers' own, consistent by construction: the unchecked op,
        # unless a transform is trained (the checked entry sends those layers per layer).
        kernels = (construct_grouped(weights, Ps, Qs, dtype=emit) if trained
                   else ops.build_grouped(weights, Ps, Qs, emit))
        for (layer, (key, *_)), kernel in zip(entries, kernels):
            layer.keep_prebuilt(key, kernel)
