"""The searchers (``controller.kind``): TAS's sampling, policy, expected MACs, FLOPs loss and
channel-wise interpolation; ISTA's recovery and policy; a search and an exact resume per kind;
every kind under every sharing strategy; the settings each kind refuses."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from apsfast import models
from apsfast.search import ConfigError, Search, load_config
from apsfast.search.searchers import (SEARCHERS, IstaSearcher, ReinforceSearcher, TasSearcher, build_searcher,
                                      distillation_loss)
from apsfast.search.deploy import program_entries
from apsfast.search.searchers.ista import dictionary, ista, one_per_decision, per_decision_probs
from apsfast.search.searchers.tas import gumbel_pairs
from apsfast.search.searchers.widths import (ExpectedMacs, Groups, channel_interpolate, flops_loss, product_beam,
                                             validation_mode)
from apsfast.search.strategies import STRATEGIES, begin_search, supernet_sharing

from test_search import TINY  # 3 epochs (1 warm-up) of 3 steps of 32 images
KINDS = ("tas", "ista")


def tiny(*more: str):
    return load_config("demo", overrides=[*TINY, *more])


def quiet(text: str) -> None:
    pass


def supernet(config, strategy: str = "transitional", **options):
    return models.build(config.model.name, sharing=supernet_sharing(strategy), **{**config.model.options, **options})


def enumerate_expected(net, probs):
    """Σ over every arch of Π_d p_d(a_d) · MACs(arch): the definition, by enumeration."""
    total = torch.zeros((), dtype=torch.float64)
    for arch in itertools.product(*(range(len(p)) for p in probs)):
        weight = math.prod(float(p[a]) for p, a in zip(probs, arch))
        total += weight * net.flops(list(arch))
    return total


# --- TAS -------------------------------------------------------------------------------------

def test_tas_policy_beam_and_entropy_by_hand():
    config = tiny("controller.kind=tas")
    net = supernet(config, layer_widths={"stem": [2]})
    searcher = TasSearcher(net.decisions(), config, net.flops, net=net, search_steps=10)
    with torch.no_grad():
        searcher.theta[3:, 1] = 10.0  # the others: p = (1/(1+e^10), e^10/(1+e^10))
        searcher.theta[1, :2] = torch.tensor([0.0, math.log(3.0)])  # decision 1: p = (1/4, 3/4)
        searcher.theta[2, :2] = torch.tensor([math.log(2.0), 0.0])  # decision 2: p = (2/3, 1/3)
    rest = len(net.decisions()) - 3
    q = 1 / (1 + math.exp(-10.0))
    probs = searcher.probabilities(searcher.beam(1)[0][0])
    assert probs[0] == [1.0]  # the pinned stem: padding gets no probability
    assert probs[1] == pytest.approx([0.25, 0.75]) and probs[2] == pytest.approx([2 / 3, 1 / 3])
    assert probs[3] == pytest.approx([1 - q, q])
    beam = searcher.beam(3)
    assert [arch for arch, _ in beam] == [[0, 1, 0, *[1] * rest], [0, 1, 1, *[1] * rest], [0, 0, 0, *[1] * rest]]
    for (_, loglik), p in zip(beam, (0.75 * 2 / 3, 0.75 / 3, 0.25 * 2 / 3)):
        assert loglik == pytest.approx(math.log(p) + rest * math.log(q))
    hand = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) - (2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    hand += -rest * (q * math.log(q) + (1 - q) * math.log(1 - q))
    entropy, maximum = searcher.policy_entropy()
    assert entropy == pytest.approx(hand)
    assert maximum == pytest.approx((rest + 2) * math.log(2))


def test_gumbel_pairs_against_a_hand_computation():
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.0, -math.inf], [0.0, -math.inf, -math.inf]])
    log_probs = logits.log_softmax(dim=1)
    pairs = gumbel_pairs(log_probs, [3, 2, 1], 0.7, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    noise = torch.empty(3, 3, dtype=torch.float64).exponential_(generator=generator)
    perturbed = (log_probs + -noise.log().float()) / 0.7
    for d, size in ((0, 3), (1, 2)):
        row = perturbed[d, :size].double().softmax(0) + 1e-12
        drawn = sorted(torch.multinomial(row, 2, replacement=False, generator=generator).tolist())
        narrow, wide, w_narrow, w_wide = pairs[d]
        assert [narrow, wide] == drawn
        expected = torch.stack([perturbed[d, narrow], perturbed[d, wide]]).softmax(0)
        assert float(w_narrow) == pytest.approx(float(expected[0]), rel=1e-5)
        assert float(w_wide) == pytest.approx(float(expected[1]), rel=1e-5)
    assert pairs[2][:2] == (0, 0) and float(pairs[2][3]) == 1.0


def test_tas_temperature_anneals_from_tau_max_to_tau_min():
    config = tiny("controller.kind=tas", "tas.tau_max=5", "tas.tau_min=0.1")
    net = supernet(config)
    searcher = TasSearcher(net.decisions(), config, net.flops, net=net, search_steps=50)
    taus = []
    for _ in range(60):
        taus.append(searcher.tau())
        searcher.sample_train_arch()
    assert taus[0] == 5 and taus[49] == pytest.approx(0.1) and taus[59] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize("name, options", [
    ("demo", {}),  # 13 decisions of 2 widths: every one of the 8,192 archs
    ("resnet20_cifar", {"residual": "block", "layer_widths": {f"layer{s}.{b}.conv{c}": [16] for s in (1, 2, 3)
                                                              for b in (0, 1, 2) for c in (1, 2)
                                                              if (s, b, c) not in ((1, 0, 1), (1, 0, 2), (2, 0, 2))}}),
    ("mobilenetv2_imagenet", {"layer_widths": {name: [w[1]] for name, w in
                                               models.build("mobilenetv2_imagenet", device="meta").decisions()[4:]}}),
], ids=["demo", "resnet20-block-pinned", "mobilenetv2-pinned"])
def test_expected_macs_and_flops_loss_against_enumeration(name, options):
    if name == "demo":
        net = supernet(tiny())
    else:
        net = models.build(name, device="meta", **options)
    sizes = [len(d.widths) for d in net.decisions()]
    assert math.prod(sizes) <= 8192
    logits = torch.randn(len(sizes), max(sizes), generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                         requires_grad=True)
    groups = Groups(net.decisions())
    probs = groups.rows(groups.log_probs(logits).exp())
    expected = ExpectedMacs(net)(probs)
    reference = enumerate_expected(net, [p.detach() for p in probs])
    assert float(expected.detach()) == pytest.approx(float(reference), rel=1e-9)
    target = float(reference)
    assert float(flops_loss(expected.detach(), 1.01 * target, target, 0.05)) == pytest.approx(math.log(target))
    assert float(flops_loss(expected.detach(), 0.9 * target, target, 0.05)) == pytest.approx(-math.log(target))
    assert float(flops_loss(expected.detach(), 0.97 * target, target, 0.05)) == 0.0
    assert float(flops_loss(expected.detach(), 1e12, None, 0.05)) == 0.0
    (grad,) = torch.autograd.grad(expected, [logits])  # the polynomial's gradient is exact
    if math.prod(sizes) <= 300:
        logits2 = logits.detach().clone().requires_grad_(True)
        rows = groups.rows(groups.log_probs(logits2).exp())
        total = sum(math.prod(p[a] for p, a in zip(rows, arch)).double() * net.flops(list(arch))
                    for arch in itertools.product(*(range(k) for k in sizes)))
        (reference_grad,) = torch.autograd.grad(total, [logits2])
        torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-3)


def cwi_by_hand(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    out = torch.empty(x.shape[0], channels, *x.shape[2:], dtype=x.dtype)
    for j in range(channels):
        start, end = math.floor(j * c / channels), math.ceil((j + 1) * c / channels)
        out[:, j] = x[:, start:end].mean(dim=1)
    return out


@pytest.mark.parametrize("c_in, c_out", [(3, 8), (4, 16), (5, 7), (8, 3), (6, 6)])
def test_channel_wise_interpolation_is_adaptive_average_pooling_over_channels(c_in, c_out):
    x = torch.randn(2, c_in, 3, 5, generator=torch.Generator().manual_seed(c_in))
    torch.testing.assert_close(channel_interpolate(x, c_out), cwi_by_hand(x, c_out))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channel_interpolate(channels_last, c_out), cwi_by_hand(x, c_out))


def test_distillation_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher, labels = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.arange(6)
    p_t, log_p_s = (teacher / 4).softmax(1), (student / 4).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    hand = 0.9 * 16 * kl + 0.1 * F.cross_entropy(student, labels)
    torch.testing.assert_close(distillation_loss(student, teacher, labels), hand)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, alpha=0.0), F.cross_entropy(student, labels))


# --- ISTA ------------------------------------------------------------------------------------

def test_ista_recovers_a_known_sparse_code():
    sizes = [3, 4, 2, 4, 3]
    truth = torch.zeros(sum(sizes), dtype=torch.float64)
    start = 0
    for size, choice in zip(sizes, [2, 0, 1, 3, 1]):
        truth[start + choice] = 1.0
        start += size
    a = dictionary(12, len(truth), torch.Generator().manual_seed(3))
    z = ista(a, a @ truth, sparsity=1e-4, iterations=3000)
    kept, arch = one_per_decision(z, sizes)
    assert arch == [2, 0, 1, 3, 1]
    torch.testing.assert_close(kept, truth, atol=0.02, rtol=0)
    torch.testing.assert_close(z, truth, atol=0.02, rtol=0)  # the other entries recovered as zeros


def test_ista_policy_by_hand():
    z = torch.tensor([0.0, 0.6, 0.2, 0.5, 0.5], dtype=torch.float64)
    kept, arch = one_per_decision(z, [3, 2])
    assert arch == [1, 0] and kept.tolist() == [0.0, 0.6, 0.0, 0.5, 0.0]  # a tie: the narrower
    probs = per_decision_probs(z, [3, 2], eps=0.0)
    assert probs[0].tolist() == pytest.approx([0.0, 0.75, 0.25]) and probs[1].tolist() == pytest.approx([0.5, 0.5])
    beam = product_beam([torch.tensor([0.75, 0.25]).log(), torch.tensor([0.4, 0.6]).log()], 3)
    assert [a for a, _ in beam] == [[0, 1], [0, 0], [1, 1]]
    assert beam[1][1] == pytest.approx(math.log(0.75 * 0.4))


def test_ista_searcher_sizes_its_dictionary_and_recovers_its_start():
    config = tiny("controller.kind=ista", "ista.ratio=0.5")
    net = supernet(config)
    searcher = IstaSearcher(net.decisions(), config, net.flops, net=net)
    n = sum(len(d.widths) for d in net.decisions())
    assert searcher.a.shape == (math.ceil(0.5 * n), n)
    assert torch.allclose(searcher.a.norm(dim=0), torch.ones(n, dtype=torch.float64))
    arch = searcher.sample_train_arch()
    assert arch == searcher.beam(1)[0][0]  # the result is z's argmax
    assert all(sum(p) == pytest.approx(1.0) for p in searcher.probabilities(arch))


# --- every kind in a search -------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_kind_steps_under_every_strategy(kind, strategy):
    config = tiny(f"controller.kind={kind}", f"sharing.strategy={strategy}", "reward.flops_target=20K")
    torch.manual_seed(0)
    net = supernet(config, strategy)
    begin_search(net, strategy)
    searcher = build_searcher(net.decisions(), config, net.flops, net=net, search_steps=4)
    before = {k: v.clone() for k, v in searcher.state_dict().items() if isinstance(v, torch.Tensor)}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    net.set_arch(searcher.sample_train_arch())
    with searcher.train_forward():
        F.cross_entropy(net(x), y).backward()
    assert searcher.step(lambda archs: [0.0] * len(archs), batch=(x, y)) == {}  # finished at the next step
    out = searcher.flush()
    assert math.isfinite(out["reward"]) and math.isfinite(out["entropy"])
    after = searcher.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # the policy moved
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def whole_loss_gradient(searcher, kind, x, y):
    """The gradient of the whole validation loss with respect to the policy parameter (θ or
    b), computed the direct way: the task loss differentiated through the forward."""
    param = (searcher.theta if kind == "tas" else searcher.b).detach().clone().requires_grad_(True)
    net, settings = searcher.net, searcher.settings
    if kind == "tas":
        generator = torch.Generator()
        generator.set_state(searcher.generator.get_state())
        log_probs = searcher.groups.log_probs(param)
        pairs = gumbel_pairs(log_probs, searcher.groups.sizes, searcher.tau(), generator)
        net.set_arch([wide for _, wide, _, _ in pairs])
        with validation_mode(net), searcher.mixture.active(pairs):
            task = F.cross_entropy(net(x), y)
        arch = log_probs.detach().argmax(dim=1).tolist()
        expected = searcher.expected_macs(searcher.groups.rows(log_probs.exp()))
    else:
        z = ista(searcher.a, param, settings.sparsity, settings.iterations)
        kept, arch = one_per_decision(z, searcher.sizes)
        chosen = torch.stack([kept[start + a] for start, a in zip(searcher._starts(), arch)])
        net.set_arch(arch)
        with validation_mode(net), searcher.gates.active((chosen / chosen.detach().clamp_min(1e-12)).float()):
            task = F.cross_entropy(net(x), y)
        expected = searcher.expected_macs(per_decision_probs(z, searcher.sizes))
    cost = flops_loss(expected, searcher.flops(arch), searcher.target, settings.flops_tolerance)
    (param.grad,) = torch.autograd.grad(task.double() + settings.flops_weight * cost, [param])
    return param.grad


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_finished_later_takes_the_step_of_the_whole_loss(kind, one_thread):
    # The device sends the gradient at the mixture weights or gates; the host finishes the
    # chain to the policy and adds the FLOPs loss at the next step.
    config = tiny(f"controller.kind={kind}", "reward.flops_target=20K")
    torch.manual_seed(0)
    net = supernet(config)
    begin_search(net, "transitional")
    searcher = build_searcher(net.decisions(), config, net.flops, net=net, search_steps=4)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    param = searcher.theta if kind == "tas" else searcher.b
    momentum = torch.zeros_like(param)
    beta = searcher.optimizer.param_groups[0]["betas"][0]
    for _ in range(2):  # the second from a moved policy
        grad = whole_loss_gradient(searcher, kind, x, y)
        momentum = beta * momentum + (1 - beta) * grad
        searcher.step(lambda archs: [0.0] * len(archs), batch=(x, y))
        searcher.flush()
        # Adam's first moment holds the gradients it was given.
        torch.testing.assert_close(searcher.optimizer.state[param]["exp_avg"], momentum, rtol=1e-4,
                                   atol=1e-6 * float(momentum.abs().max()))
        assert float(grad.abs().max()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_an_export_carries_none_of_a_searchers_hooks(kind):
    # TAS hooks the driven convs, ISTA their batch norms: the exported network must run
    # without them (and torch.export must trace it for a portable model.pt).
    config = tiny(f"controller.kind={kind}")
    net = supernet(config)
    build_searcher(net.decisions(), config, net.flops, net=net, search_steps=4)
    assert any(m._forward_hooks for m in net.modules())
    static = net.export(net.max_arch())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in static.modules())
    assert "program" in program_entries(static, (3, 8, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_a_search_per_kind_writes_a_valid_result(kind, tmp_path):
    result = Search(tiny(f"controller.kind={kind}", "reward.flops_target=30K"), tmp_path, log=quiet).run()
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert result["config"]["controller"]["kind"] == kind
    logliks = [c["loglik"] for c in result["candidates"]]
    assert logliks == sorted(logliks, reverse=True) and len(logliks) == 4
    assert all(sum(d["probs"]) == pytest.approx(1.0) for d in result["decisions"])
    assert 0 <= result["policy"]["entropy_fraction"] <= 1
    assert (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_search_per_kind_resumes_to_the_same_result(kind, tmp_path):
    config = tiny(f"controller.kind={kind}", "reward.flops_target=30K")
    reference = Search(config, tmp_path / "whole", log=quiet)
    expected = reference.run()
    interrupted = Search(config, tmp_path / "cut", log=quiet)
    calls = {"n": 0}
    original = interrupted.train_step

    def stop_at_step_9(*args):
        calls["n"] += 1
        if calls["n"] == 9:  # in the search phase; the last checkpoint is step 8's, mid-epoch
            raise KeyboardInterrupt
        return original(*args)

    interrupted.train_step = stop_at_step_9
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = Search(config, tmp_path / "cut", resume=True, log=quiet)
    assert resumed.step == 8
    assert resumed.run() == expected
    whole, cut = reference.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(v, cut[k]) for k, v in whole.items())
    for key, value in reference.searcher.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.searcher.state_dict()[key])


def test_the_default_kind_is_reinforce_and_needs_no_batch():
    config = tiny()
    net = supernet(config)
    searcher = build_searcher(net.decisions(), config, net.flops, net=net, search_steps=3)
    assert type(searcher) is ReinforceSearcher and set(SEARCHERS) == {"reinforce", "tas", "ista"}
    assert searcher.step(lambda archs: [0.5] * len(archs)) == {}  # finished at the next step
    assert searcher.step(lambda archs: [0.5] * len(archs))["reward"] == 0.5
    assert searcher.flush()["reward"] == 0.5 and searcher.flush() == {}
    for kind in KINDS:
        other = build_searcher(net.decisions(), tiny(f"controller.kind={kind}"), net.flops, net=net, search_steps=3)
        with pytest.raises(ValueError, match=f"the {kind} searcher .* needs the validation batch"):
            other.step(lambda archs: [0.5] * len(archs))


@pytest.mark.parametrize("override, message", [
    ("controller.kind=darts", "controller.kind must be one of reinforce, tas, ista, got 'darts'"),
    ("tas.lr=0", "tas.lr must be > 0, got 0.0"),
    ("tas.tau_min=0", "tas.tau_min must be > 0, got 0.0"),
    ("tas.tau_max=0.01", "tas.tau_max must be ≥ tas.tau_min = 0.1, got 0.01"),
    ("tas.betas=[0.5]", r"tas.betas must be two numbers in \[0, 1\), got \[0.5\]"),
    ("tas.flops_weight=-1", "tas.flops_weight must be ≥ 0, got -1.0"),
    ("tas.flops_tolerance=1", r"tas.flops_tolerance must be in \[0, 1\), got 1.0"),
    ("tas.weight_decay=-0.1", "tas.weight_decay must be ≥ 0, got -0.1"),
    ("ista.ratio=1", r"ista.ratio must be in \(0, 1\) \(fewer measurements than candidates\), got 1.0"),
    ("ista.iterations=0", "ista.iterations must be > 0, got 0"),
    ("ista.sparsity=-0.5", "ista.sparsity must be ≥ 0, got -0.5"),
    ("ista.lr=-1", "ista.lr must be > 0, got -1.0"),
    ("ista.flops_tolerance=-0.1", r"ista.flops_tolerance must be in \[0, 1\), got -0.1"),
])
def test_bad_searcher_settings_are_refused_with_one_line(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$") as error:
        tiny(override)
    assert "\n" not in str(error.value)
