"""Grouped construction of every candidate kernel of an architecture vs a per-layer loop.

``python -m pytest bench/bench_construct_grouped.py --benchmark-enable``; in the test suite
each case runs once, untimed.
"""
from __future__ import annotations

import pytest
import torch

import apsfast
from apsfast.benchmarks.kernels import SPACES, network_layers


@pytest.mark.parametrize("model", SPACES)
@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_build_all_kernels(benchmark, model, path):
    # The first layers of the widest arch keep the untimed suite run short.
    layers, in_widths = network_layers(model, "cpu", torch.float32, limit=8)
    operands = [layer.prebuild_operands(w) for layer, w in zip(layers, in_widths)]
    weights, Ps, Qs = ([o[k] for o in operands] for k in (1, 2, 3))

    def step():
        if path == "grouped":
            kernels = apsfast.construct_grouped(weights, Ps, Qs)
        else:
            kernels = [apsfast.construct(w, P, Q) for w, P, Q in zip(weights, Ps, Qs)]
        torch.autograd.backward([k.sum() for k in kernels])
        return kernels

    kernels = benchmark(step)
    assert len(kernels) == len(weights) == 8 and all(w.grad is not None for w in weights)
