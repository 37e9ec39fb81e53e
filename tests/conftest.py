"""Shared test helpers: tolerances per dtype, backend parametrisation, hypothesis profiles."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import apsfast
from apsfast import _backends

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)  # --hypothesis-profile=deep
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# (rtol, atol) for comparing a backend with the float64 reference; one place for all tests.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare with the tolerance of ``dtype`` (default: ``actual``'s dtype), in float64."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def compiled_backends() -> list[str]:
    """Backends to test on CPU tensors: the reference, and every compiled CPU backend built."""
    return ["reference"] + [name for name in ("cpu",) if name in apsfast.backends()]


@pytest.fixture(params=compiled_backends())
def backend(request, monkeypatch) -> str:
    """Force each available CPU-capable backend in turn through APSFAST_BACKEND."""
    monkeypatch.setenv(_backends.ENV_VAR, request.param)
    return request.param


def pytest_runtest_setup(item):
    # CUDA is queried when a gpu test is about to run, never at import or collection time.
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
