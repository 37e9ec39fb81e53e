"""What a static network costs: multiply-accumulates (MACs) and parameters, per layer.

The convention is the one of the channel-search literature's tables (the "FLOPs" of the APS
paper are MACs): a conv costs ``H_out · W_out · C_out · C_in / groups · kh · kw``, a linear
layer ``in · out``; batch norm folds into the preceding conv at inference and costs no MAC,
and ReLU, pooling and residual additions are not counted. Parameters are every learnable
tensor: conv and linear weights and biases and the batch-norm scale and shift (running
statistics are buffers, not parameters).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from apsfast import _checks

KINDS = ("conv", "linear", "bn")


@dataclass(frozen=True)
class LayerShape:
    """One costed layer of a static network.

    ``name`` is its path in the exported module; ``out_hw`` the spatial size of its output
    (``(1, 1)`` for linear layers); ``groups`` equals the channel count for a depthwise conv.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    out_hw: tuple[int, int] = (1, 1)
    bias: bool = False

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward of one sample."""
        if self.kind == "bn":
            return 0
        kh, kw = self.kernel_size
        return self.out_hw[0] * self.out_hw[1] * self.out_channels * (self.in_channels // self.groups) * kh * kw

    @property
    def params(self) -> int:
        """Learnable parameters: weight and bias, or a batch norm's scale and shift."""
        if self.kind == "bn":
            return 2 * self.out_channels if self.bias else 0
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw + (self.out_channels if self.bias else 0)


def count_macs(module: nn.Module, input_size: Union[int, Sequence[int]], in_channels: int = 3) -> dict[str, int]:
    """MACs of every ``nn.Conv2d`` and ``nn.Linear`` of ``module``, measured by forward hooks
    on one ``[1, in_channels, H, W]`` input (the check of the analytic counts, and a way to
    count a network modified after export). Returns ``{module path: MACs}``.
    """
    size = (input_size, input_size) if isinstance(input_size, numbers.Integral) else tuple(input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
    for side in size:
        _checks.positive_int("input_size", side)
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(layer: nn.Module, inputs, output) -> None:
            if isinstance(layer, nn.Conv2d):
                kh, kw = layer.kernel_size
                per_output = layer.in_channels // layer.groups * kh * kw
            else:
                per_output = layer.in_features
            counts[name] = counts.get(name, 0) + output[0].numel() * per_output
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    reference = next(module.parameters(), torch.empty(0))  # its dtype and device, if it has any
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, in_channels, *size, dtype=reference.dtype, device=reference.device))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return counts
