"""The CUDA C++ backend: thin adapters over the ``apsfast_cuda::`` ops of ``apsfast._cuda``.

The kernels (``csrc/cuda``) read strided inputs directly, accumulate in float32 (float64 for
float64 tensors) and run on torch's current CUDA stream.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from apsfast._build import load_extension

load_extension("_cuda")

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in _DTYPES


def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    return torch.ops.apsfast_cuda.construct(weight, P, Q)


def construct_backward(grad: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor],
                       need_weight: bool, need_P: bool, need_Q: bool) -> list[Tensor]:
    return torch.ops.apsfast_cuda.construct_backward(grad, weight, P, Q, need_weight, need_P, need_Q)


def construct_grouped(weights: list[Tensor], Ps: list[Optional[Tensor]],
                      Qs: list[Optional[Tensor]]) -> list[Tensor]:
    return torch.ops.apsfast_cuda.construct_grouped(weights, Ps, Qs)


def transition_step_all(Ms: list[Tensor], widths: list[int], counts: list[int], partner: list[int],
                        tau: float) -> Tensor:
    return torch.ops.apsfast_cuda.transition_step_all(Ms, widths, counts, partner, tau)
