"""The CPU C++ backend: the ``apsfast_cpu::`` ops of ``apsfast._C`` (schemas in
``csrc/op_schemas.h``; the signatures of the reference's functions)."""
from __future__ import annotations

import torch

from apsfast._backends import sharing_torch
from apsfast._build import load_extension

load_extension("_C")

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

construct = torch.ops.apsfast_cpu.construct
construct_backward = torch.ops.apsfast_cpu.construct_backward
construct_grouped = torch.ops.apsfast_cpu.construct_grouped
transition_step_all = torch.ops.apsfast_cpu.transition_step_all
# Φ of one layer: no kernel of its own (the batched transition computes it fused), torch ops.
sharing_level = sharing_torch.sharing_level
sharing_level_backward = sharing_torch.sharing_level_backward


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES
