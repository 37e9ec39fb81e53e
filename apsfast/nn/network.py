"""Network-wide operations over every APS layer of a model: Φ, the transition, and the
grouped construction of all candidate kernels of a sampled architecture."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from apsfast.functional import construct_grouped
from apsfast.nn.base import APSLayer
from apsfast.sharing import transition_step_all


def aps_layers(module: nn.Module) -> list[APSLayer]:
    """Every APS layer of ``module``, in ``module.modules()`` order."""
    return [m for m in module.modules() if isinstance(m, APSLayer)]


def network_sharing_level(module: nn.Module) -> Tensor:
    """The network's Φ: the sum of its APS layers' (paper eq. 4)."""
    layers = aps_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no APS layer")
    return torch.stack([layer.sharing_level() for layer in layers]).sum()


def network_transition_step(module: nn.Module, tau: float, *, relative: bool = True) -> Tensor:
    """One transition step (eq. 5) of every APS layer of ``module`` in one batched call.

    APS-T layers still at their exact ordinal start are perturbed first (see
    :meth:`APSLayer.begin_transition`); ``relative`` (the default, the search's rate) as in
    :func:`apsfast.transition_step_all`.
    Returns the network's Φ before the step.
    """
    layers = [layer for layer in aps_layers(module) if layer.P is not None or layer.Q is not None]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no APS layer with candidate transforms")
    for layer in layers:
        layer.begin_transition()
    phi = transition_step_all([(layer.P, layer.Q) for layer in layers], tau, relative=relative)
    for layer in layers:
        layer.mark_transformed()
    return phi


def prebuild_kernels(items: Sequence[tuple[APSLayer, int]]) -> None:
    """Build the candidate weights of many layers in one grouped call, for their next forward.

    Args:
        items: ``(layer, in_width)`` pairs: each layer's next input width under the sampled
            architecture (its ``active_out`` must already be set). Layers whose weight is a
            free slice (exact selections) are skipped.

    Each prebuilt weight serves the next forward of its layer only, and only if the input and
    output candidates match and the meta-weight has not changed since; otherwise it is
    discarded and the layer builds its own. Gradients reach the meta-weights through the
    grouped backward.
    """
    groups: dict[tuple[torch.dtype, torch.device], list] = {}
    for layer, in_width in items:
        operands = layer.prebuild_operands(in_width)
        if operands is not None:
            groups.setdefault((layer.weight.dtype, layer.weight.device), []).append((layer, operands))
    for entries in groups.values():
        kernels = construct_grouped([op[1] for _, op in entries], [op[2] for _, op in entries],
                                    [op[3] for _, op in entries])
        for (layer, (key, *_)), kernel in zip(entries, kernels):
            layer._prebuilt = ((key, layer.weight._version), kernel)
