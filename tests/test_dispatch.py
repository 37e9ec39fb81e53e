"""Default dispatch follows the benchmark table; APSFAST_BACKEND overrides it."""
from __future__ import annotations

import pytest
import torch

import apsfast
from apsfast import _backends


@pytest.fixture
def unforced(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)


def test_cpu_defaults(unforced):
    cpu, f32 = torch.device("cpu"), torch.float32
    expected_transition = "apsfast._backends.cpu" if "cpu" in apsfast.backends() else "apsfast.reference"
    assert _backends.select("transition_step_all", cpu, f32).__name__ == expected_transition
    # The C++ construction only ties the reference on CPU, so it is not the default.
    for op in ("construct", "construct_backward", "construct_grouped"):
        assert _backends.select(op, cpu, f32).__name__ == "apsfast.reference"
    # No compiled backend for a dtype it does not serve.
    assert _backends.select("transition_step_all", cpu, torch.float16).__name__ == "apsfast.reference"


def test_forced_backend_serves_every_op(monkeypatch):
    if "cpu" not in apsfast.backends():
        pytest.skip("the CPU extension is not built")
    monkeypatch.setenv(_backends.ENV_VAR, "cpu")
    for op in ("construct", "construct_backward", "construct_grouped", "transition_step_all"):
        assert _backends.select(op, torch.device("cpu"), torch.float64).__name__ == "apsfast._backends.cpu"
    with pytest.raises(_backends.BackendUnavailable, match="cannot run construct on cpu tensors of dtype torch.float16"):
        _backends.select("construct", torch.device("cpu"), torch.float16)
