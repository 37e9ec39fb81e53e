"""The batched transition step of a whole network vs per-layer autograd of Φ.

``python -m pytest bench/bench_transition.py --benchmark-enable``; in the test suite each case
runs once, untimed.
"""
from __future__ import annotations

import pytest
import torch

import apsfast
from apsfast.benchmarks.kernels import SPACES, network_layers, per_layer_autograd_step


@pytest.mark.parametrize("model", SPACES)
@pytest.mark.parametrize("path", ["batched", "per_layer_autograd"])
def test_transition_step(benchmark, model, path):
    layers, _ = network_layers(model, "cpu", torch.float32, limit=8, every_layer=True)
    pairs = [(layer.P, layer.Q) for layer in layers]
    before = apsfast.nn.network_sharing_level(torch.nn.ModuleList(layers))
    if path == "batched":
        benchmark(apsfast.transition_step_all, pairs, 1e-6)
    else:
        benchmark(per_layer_autograd_step, pairs, 1e-6)
    assert apsfast.nn.network_sharing_level(torch.nn.ModuleList(layers)) < before
