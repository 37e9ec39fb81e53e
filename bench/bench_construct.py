"""Candidate-kernel construction: forward + backward per backend, on ResNet-20 CIFAR shapes.

Time with ``python -m pytest bench/bench_construct.py --benchmark-enable``; the test suite
runs each case once with timing disabled, so the benchmark cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import apsfast
from apsfast import _backends

# (meta width, candidate width) per side for the widths {16, 32, 64, 96}: meta = Σ = 208.
SHAPES = {"narrow": (208, 16, 208, 16), "mixed": (208, 64, 208, 32), "widest": (208, 96, 208, 96)}
BACKENDS = [name for name in ("reference", "cpu") if name in apsfast.backends()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_construct_fwd_bwd(benchmark, monkeypatch, backend, shape):
    monkeypatch.setenv(_backends.ENV_VAR, backend)
    C_out, c_o, C_in, c_i = SHAPES[shape]
    weight = torch.randn(C_out, C_in, 3, 3, requires_grad=True)
    P, Q = torch.randn(C_out, c_o), torch.randn(C_in, c_i)

    def step():
        apsfast.construct(weight, P, Q).sum().backward()

    benchmark(step)
    assert weight.grad is not None and weight.grad.shape == weight.shape
