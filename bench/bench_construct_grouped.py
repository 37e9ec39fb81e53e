"""Grouped construction of every candidate kernel of an architecture vs a per-layer loop.

``python -m pytest bench/bench_construct_grouped.py --benchmark-enable``; in the test suite
each case runs once, untimed.
"""
from __future__ import annotations

import pytest
import torch

import apsfast
from apsfast.benchmarks.kernels import make_layer, mobilenetv2_layers, resnet20_layers

MODELS = {"resnet20": resnet20_layers, "mobilenetv2": mobilenetv2_layers}


def operands(model: str):
    shapes = MODELS[model](2)[:8]  # the first layers keep the untimed suite run short
    layers = [make_layer(s, "transitional", "cpu", torch.float32) for s in shapes]
    ops = [layer.prebuild_operands(s.in_widths[-1]) for layer, s in zip(layers, shapes)]
    return [o[1] for o in ops], [o[2] for o in ops], [o[3] for o in ops]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_build_all_kernels(benchmark, model, path):
    weights, Ps, Qs = operands(model)

    def step():
        if path == "grouped":
            kernels = apsfast.construct_grouped(weights, Ps, Qs)
        else:
            kernels = [apsfast.construct(w, P, Q) for w, P, Q in zip(weights, Ps, Qs)]
        torch.autograd.backward([k.sum() for k in kernels])
        return kernels

    kernels = benchmark(step)
    assert len(kernels) == len(weights) and all(w.grad is not None for w in weights)
