"""APS-T's default transition rate spans the search phase: Φ falls by at least 30% over it and
the middle of the phase has done between 25% and 85% of the fall, for every preset's space;
on the demo's, Φ follows its line without plateaus or cliffs and then holds, so that the
meta-weights have the end of the phase to adapt.

The transition depends on P, Q only, so it runs here without data. The demo preset runs its
whole search phase (368 steps); the paper's presets run their space (ImageNet ones with their
candidate counts and structure at narrower widths) over a 60- or 120-step phase: the steered rate
works in fractions of the phase, so the length changes the step size, not the shape (the fall and
the share of it done by the middle: ResNet-20's space 36%, 77% at 240 steps and 36%, 63% at 120;
ResNet-18's narrow space 36%, 77% and 38%, 77%; MobileNet-v2's 39%, 76% at 120 and 36%, 73% at 60)."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from apsfast import models
from apsfast.nn import network_sharing_level
from apsfast.search import load_config
from apsfast.search.strategies import TransitionRate, after_weight_step, transition


@lru_cache(maxsize=None)
def phase_path(name: str, options: str, steps: int, fall: float, end: float) -> tuple[list[float], TransitionRate]:
    """Φ before each of the phase's ``steps`` transitions and after the last, at the steered
    rate of the settings ``fall`` and ``end``; and the rate (``options``: the space's as JSON,
    a key of the cache)."""
    torch.manual_seed(0)
    net = models.build(name, **json.loads(options))
    rate = TransitionRate(None, steps, fall=fall, end=end)
    phis = []
    with torch.no_grad():
        for step in range(1, steps + 1):
            phi = transition(net, rate.tau)
            phis.append(float(phi))
            rate.observe(step, phi)
    phis.append(float(network_sharing_level(net)))
    return phis, rate


def phase_fall(name: str, options: dict, steps: int, sharing) -> tuple[float, float]:
    phis, _ = phase_path(name, json.dumps(options, sort_keys=True), steps, sharing.transition_fall,
                         sharing.transition_end)
    start, middle, end = phis[0], phis[steps // 2], phis[-1]
    return (start - end) / start, (start - middle) / (start - end)


def preset_case(preset: str, widths=None, steps=None):
    config = load_config(preset)
    train = config.train
    options = dict(config.model.options)
    if widths is not None:
        options.update(widths=widths, input_size=32)
    if steps is None:  # the whole search phase of the preset
        per_epoch = (round(6000 * (1 - config.data.val_fraction)) // train.batch_size)
        steps = per_epoch * (train.epochs - train.warmup_epochs)
    assert config.sharing.tau is None  # the preset uses the steered rate
    return config.model.name, options, steps, config.sharing


@pytest.mark.parametrize("preset, widths, steps", [
    pytest.param("demo", None, None, id="demo-whole-phase"),
    pytest.param("resnet20_cifar", None, 120, id="resnet20_cifar"),
    pytest.param("resnet18_imagenet", [8, 12, 16, 20], 120, id="resnet18_imagenet-narrow"),
    pytest.param("mobilenetv2_imagenet", [2, 3, 4, 5], 60, id="mobilenetv2_imagenet-narrow"),
])
def test_phi_falls_over_the_whole_search_phase(preset, widths, steps):
    name, options, steps, sharing = preset_case(preset, widths, steps)
    fall, done_at_middle = phase_fall(name, options, steps, sharing)
    assert fall >= 0.30, f"Φ fell by {fall:.0%} only"
    assert 0.25 <= done_at_middle <= 0.85, f"{done_at_middle:.0%} of the fall was done at the middle"


def test_phi_follows_its_line_then_holds():
    # The demo's whole phase: a staircase (the former bang-bang law: flat for a fifth of the
    # phase, a third of the fall in two epochs, flat again) or a fall that runs to the last step
    # fails here.
    name, options, steps, sharing = preset_case("demo")
    phis, rate = phase_path(name, json.dumps(options, sort_keys=True), steps, sharing.transition_fall,
                            sharing.transition_end)
    start, total = phis[0], phis[0] - phis[-1]
    ends = round(steps * sharing.transition_end)
    tenth = steps // 10
    for first in range(2 * tenth, ends - tenth + 1, tenth // 2):  # past the ordinal plateau, up to the line's end
        window = phis[first] - phis[first + tenth]
        line = rate.target(first) - rate.target(first + tenth)
        assert 0.3 * line <= window <= 2.5 * line, (
            f"Φ fell {window / start:.1%} of its start over steps {first}–{first + tenth}, "
            f"its line {line / start:.1%}")
    for step in range(3 * tenth, steps + 1, tenth // 2):  # near the line from a third of the phase on
        assert abs(phis[step] - rate.target(step)) <= 0.2 * total, f"Φ off its line at step {step}"
    held = phis[min(ends + tenth // 2, steps)] - phis[-1]
    assert held <= 0.05 * total, f"Φ still fell {held / total:.0%} of its fall after the line's end"


@pytest.mark.parametrize("every", [1, 2])
def test_a_short_phase_starts_under_the_stable_bound(every):
    # The steered start is 1 / steps; on a phase of a few steps that is far above the bound
    # (τ = 1/8 with a step of 2τ multiplied the demo space's Φ by 22).
    config = load_config("demo")
    torch.manual_seed(0)
    net = models.build(config.model.name, **config.model.options)
    start = float(network_sharing_level(net))
    rate = TransitionRate(None, 8, every=every)
    assert rate.tau * every <= TransitionRate.TAU_MAX
    with torch.no_grad():
        for step in range(1, 9):
            phi = after_weight_step(net, "transitional", rate.tau, step, every)
            rate.observe(step, phi, every)
    assert float(network_sharing_level(net)) <= start


def test_a_fixed_tau_is_kept():
    rate = TransitionRate(1e-3, 100)
    for step in range(1, 101):
        rate.observe(step, torch.tensor(float(step)))
    assert rate.tau == 1e-3 and rate.state_dict()["phi0"] is None
