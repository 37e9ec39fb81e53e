"""One search step (weight step, transition, controller step) of each provider: apsfast, the
plain-PyTorch way and the exported static network.

``python -m pytest bench/bench_search.py --benchmark-enable``; in the test suite each case
runs once, untimed, on a small case. ``apsfast bench search`` prints the full sweep.
"""
from __future__ import annotations

import pytest
import torch

from apsfast.benchmarks.step import PROVIDERS, Case, make_search, providers


@pytest.mark.parametrize("provider", PROVIDERS)
def test_search_step(benchmark, tmp_path, provider):
    search = make_search(Case("resnet20_cifar", 16, 8, 0.5), "cpu", "none", False, tmp_path)
    steps, _ = providers(search)
    before = {k: v.clone() for k, v in search.net.state_dict().items()}
    benchmark(steps[provider])
    moved = any(not torch.equal(v, search.net.state_dict()[k]) for k, v in before.items())
    assert moved == (provider != "limit")  # the limit trains its own static copy


def test_step_profile_runs(tmp_path):
    # The step profiler (apsfast bench profile) on a tiny case: every part timed, a profile written.
    from apsfast.benchmarks import profile
    profile.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "profile.md").read_text()
    for part in ("apsfast step", "limit step", "weight step", "controller sample", "controller step",
                 "transition [reference]", "Top ops by host time"):
        assert part in text
