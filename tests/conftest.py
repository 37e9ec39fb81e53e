"""Shared test fixtures: tolerances per dtype, backend forcing, hypothesis profiles.

Case lists and input helpers live in ``cases.py``; this file holds what pytest must see
(fixtures, hooks) and ``assert_close``, which other test files import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings

import apsfast
from apsfast import _backends
from guard import scoped, settings_guard  # noqa: F401  (fixtures: every test is guarded)

# Derandomised unless asked otherwise: every run tests the same examples.
#   --hypothesis-profile=explore  random examples (new ones each run)
#   --hypothesis-profile=deep     many more random examples
settings.register_profile("dev", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=100, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Under pytest-xdist (make test) the workers share the cores: each takes its share of threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# (rtol, atol) for comparing a backend with the float64 reference; one place for all tests.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture
def one_thread(scoped):
    """One intra-op thread for a test of tiny models or many small GEMMs: a second thread only
    adds waking and synchronisation, which on a busy two-core machine costs more than the work."""
    scoped.set_num_threads(1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare with the tolerance of ``dtype`` (default: ``actual``'s dtype), in float64."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def compiled_backends() -> list[str]:
    """Backends to test on CPU tensors: the reference, and every compiled CPU backend built."""
    return ["reference"] + [name for name in ("cpu",) if name in apsfast.backends()]


@pytest.fixture(params=compiled_backends())
def backend(request, scoped) -> str:
    """Force each available CPU-capable backend in turn through APSFAST_BACKEND."""
    scoped.setenv(_backends.ENV_VAR, request.param)
    return request.param


@dataclass(frozen=True)
class Target:
    """Where a test runs: a device and the backend forced for every op."""

    device: torch.device
    backend: str

    def supports(self, dtype: torch.dtype) -> bool:
        return _backends._load(self.backend).supports(self.device, dtype)

    def require(self, dtype: torch.dtype) -> None:
        """Skip a case whose dtype this backend does not serve (forced, it would raise)."""
        if not self.supports(dtype):
            pytest.skip(f"the {self.backend} backend does not serve {dtype} on {self.device.type}")


def _expected_backends() -> set[str]:
    return {name for name in os.environ.get("APSFAST_EXPECT_BACKENDS", "").split(",") if name}


@pytest.fixture
def target(request, scoped) -> Target:
    """A ``(device, backend)`` case of ``cases.py``, given by indirect parametrisation; forces
    the backend through APSFAST_BACKEND. A backend that is not built is skipped, or fails when
    ``APSFAST_EXPECT_BACKENDS`` names it."""
    device, name = request.param
    if name not in apsfast.backends():
        reason = _backends.status()[name]
        if name in _expected_backends():
            pytest.fail(f"APSFAST_EXPECT_BACKENDS names {name}, which is unavailable: {reason}")
        pytest.skip(f"the {name} backend is unavailable: {reason}")
    found = Target(torch.device(device), name)
    if not found.supports(torch.float32):
        # The Triton kernels run on CPU tensors only when TRITON_INTERPRET=1 was set before
        # triton was first imported (make test sets it).
        pytest.skip(f"the {name} backend does not run on {device} tensors here")
    scoped.setenv(_backends.ENV_VAR, name)
    return found


def pytest_runtest_setup(item):
    # CUDA is queried when a gpu test is about to run, never at import or collection time.
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
