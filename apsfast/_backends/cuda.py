"""The CUDA C++ backend: the ``apsfast_cuda::`` ops of ``apsfast._cuda`` (schemas in
``csrc/op_schemas.h``; the signatures of the reference's functions).

The kernels (``csrc/cuda``) read strided inputs directly, accumulate in float32 (float64 for
float64 tensors) and run on torch's current CUDA stream.
"""
from __future__ import annotations

import torch

from apsfast._backends import sharing_torch
from apsfast._build import load_extension

load_extension("_cuda")

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

construct = torch.ops.apsfast_cuda.construct
construct_backward = torch.ops.apsfast_cuda.construct_backward
construct_grouped = torch.ops.apsfast_cuda.construct_grouped
transition_step_all = torch.ops.apsfast_cuda.transition_step_all
# Φ of one layer: no kernel of its own (the batched transition computes it fused), torch ops.
sharing_level = sharing_torch.sharing_level
sharing_level_backward = sharing_torch.sharing_level_backward


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in _DTYPES
