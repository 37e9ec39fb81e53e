"""The controller: sampling, likelihoods, beam search, REINFORCE on a toy reward, the reward."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from apsfast import models
from apsfast.search import Controller, Reinforce, flops_reward

CHOICES = (3, 2, 4, 3)


# The controller's options: none, and every one (stacked cells, the decision-index and budget inputs).
OPTIONS = [{}, {"layers": 2, "layer_input": True, "budget": lambda prefix: 1 - prefix.sum(1) / 10}]


def controller(seed: int = 0, choices=CHOICES) -> Controller:
    torch.manual_seed(seed)
    return Controller(choices, hidden_size=16)


def test_built_from_a_supernet():
    net = models.build("resnet20_cifar", residual="stage", device="meta")
    policy = Controller(net.decisions())
    assert policy.num_choices == (4,) * 13
    arch = policy.sample(generator=torch.Generator().manual_seed(0)).archs[0].tolist()
    net.set_arch(arch)  # a valid architecture of the space
    assert net.arch == arch


def test_sampling_is_reproducible_and_in_range():
    policy = controller()
    a = policy.sample(64, torch.Generator().manual_seed(1))
    b = policy.sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(a.archs, b.archs)
    assert a.archs.shape == (64, 4) and (a.archs < torch.tensor(CHOICES)).all() and (a.archs >= 0).all()
    assert [p.shape for p in a.probs] == [(64, n) for n in CHOICES]
    # At init every candidate is about equally likely: entropy near Σ log n.
    assert a.entropy.mean().item() == pytest.approx(sum(math.log(n) for n in CHOICES), rel=0.05)


def sharp_policy(options: dict, scale: float) -> Controller:
    """A float64 policy with ``options`` (seed 0), its weights scaled by ``scale``: far from uniform."""
    torch.manual_seed(0)
    policy = Controller(CHOICES, hidden_size=16, **options).double()
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(scale)
    return policy


def unrolled(policy: Controller, archs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The policy's definition, one decision at a time with its modules: log-probabilities,
    entropies and probabilities of ``archs`` — what the one-call scoring must equal."""
    batch = archs.shape[0]
    state = [(torch.zeros(batch, policy.hidden_size, dtype=policy.start.dtype),) * 2] * (1 + len(policy.upper))
    x, log_prob, entropy, probs = policy.start.expand(batch, -1), 0.0, 0.0, []
    for k, head in enumerate(policy.heads):
        if policy.positions is not None:
            x = x + policy.positions.weight[k]
        if policy.budget_in is not None:
            x = x + policy.budget_in(policy.budget(archs[:, :k]).to(x)[:, None])
        new = []
        for cell, hc in zip([policy.lstm, *policy.upper], state):
            new.append(cell(x, hc))
            x = new[-1][0]
        state = new
        logp = torch.log_softmax(head(x), -1)
        log_prob = log_prob + logp.gather(1, archs[:, k:k + 1]).squeeze(1)
        entropy = entropy - (logp.exp() * logp).sum(-1)
        probs.append(logp.exp())
        x = policy.embeddings[k](archs[:, k])
    return log_prob, entropy, probs


@pytest.mark.parametrize("options", OPTIONS)
def test_scoring_in_one_call_equals_the_unrolled_policy(options):
    # float64: the sequence LSTM and the cell loop sum in different orders.
    torch.manual_seed(0)
    policy = Controller(CHOICES, hidden_size=16, **options).double()
    archs = policy.sample_archs(6, torch.Generator().manual_seed(2))
    rollout = policy.evaluate(archs)
    log_prob, entropy, probs = unrolled(policy, archs)
    torch.testing.assert_close(rollout.log_prob, log_prob)
    torch.testing.assert_close(rollout.entropy, entropy)
    for got, want in zip(rollout.probs, probs, strict=True):
        torch.testing.assert_close(got, want)
    weights = torch.tensor([0.3, -1.0, 0.5, 2.0, 0.1, -0.4], dtype=torch.float64)
    params = [p for p in policy.parameters()]
    got = torch.autograd.grad((weights * rollout.log_prob).sum() + rollout.entropy.sum(), params, allow_unused=True)
    want = torch.autograd.grad((weights * log_prob).sum() + entropy.sum(), params, allow_unused=True)
    for name, g, w in zip([n for n, _ in policy.named_parameters()], got, want, strict=True):
        assert (g is None) == (w is None), name  # the last decision's embedding is never read
        if g is not None:
            torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("options", OPTIONS)
def test_sampling_is_the_gumbel_max_of_the_policy(options):
    # The host's draw is argmax(logits + G) per decision with the policy's modules, fed back
    # autoregressively, on the noise the generator gives (float64: no near ties).
    policy = sharp_policy(options, 10)  # far from uniform, so a wrong feed shows
    archs = policy.sample_archs(256, torch.Generator().manual_seed(4))
    gumbel = -torch.empty(256, len(CHOICES), max(CHOICES)).exponential_(generator=torch.Generator().manual_seed(4)).log()
    batch = archs.shape[0]
    state = [(torch.zeros(batch, 16, dtype=torch.float64),) * 2] * (1 + len(policy.upper))
    x, want = policy.start.expand(batch, -1), []
    with torch.no_grad():
        for k, (head, n) in enumerate(zip(policy.heads, CHOICES)):
            if policy.positions is not None:
                x = x + policy.positions.weight[k]
            if policy.budget_in is not None:
                prefix = torch.stack(want, 1) if want else torch.zeros(batch, 0, dtype=torch.long)
                x = x + policy.budget_in(policy.budget(prefix).to(x)[:, None])
            for layer, cell in enumerate([policy.lstm, *policy.upper]):
                state[layer] = cell(x, state[layer])
                x = state[layer][0]
            want.append((head(x) + gumbel[:, k, :n]).argmax(-1))
            x = policy.embeddings[k](want[-1])
    assert torch.equal(archs, torch.stack(want, 1))
    assert len(set(map(tuple, archs.tolist()))) > 10  # draws, not one arch


def test_sampling_draws_from_the_policy():
    # Gumbel-max per decision, fed back autoregressively: the frequencies of whole archs match
    # their likelihoods (a policy made far from uniform, so a wrong feed or draw shows).
    policy = controller(1, choices=(3, 2, 3))
    with torch.no_grad():
        for param in policy.parameters():
            param.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(param.numel()))
    draws = 40_000
    archs = policy.sample_archs(draws, torch.Generator().manual_seed(3))
    every = torch.tensor(list(itertools.product(range(3), range(2), range(3))))
    expected = policy.evaluate(every).log_prob.exp().detach()
    assert expected.max() > 0.2 and expected.min() < 0.02  # far from uniform
    seen = (archs[:, None, :] == every[None]).all(-1).float().mean(0)
    # Within 5 standard errors of each arch's frequency.
    assert ((seen - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt() + 1e-4).all()
    assert torch.equal(archs, policy.sample_archs(draws, torch.Generator().manual_seed(3)))


def test_evaluate_errors():
    policy = controller()
    with pytest.raises(ValueError, match=r"archs must be \[B, 4\]"):
        policy.evaluate([[0, 0, 0]])
    with pytest.raises(ValueError, match=r"archs\[0, 1\] = 2 is out of range: decision 1 has 2 candidates"):
        policy.evaluate([0, 2, 0, 0])
    with pytest.raises(TypeError, match="decisions must be a non-empty sequence"):
        Controller([])


def test_beam_search_is_exact_with_a_wide_beam_and_sorted():
    policy = controller(3)
    with torch.no_grad():  # sharpen the policy so the ranking is not a near tie
        for head in policy.heads:
            head.weight.mul_(20)
    every = torch.tensor(list(itertools.product(*(range(n) for n in CHOICES))))
    likelihood = policy.evaluate(every).log_prob.detach()
    order = likelihood.argsort(descending=True)
    beams = policy.beam_search(len(every))
    assert [a for a, _ in beams] == every[order].tolist()
    assert [s for _, s in beams] == pytest.approx(likelihood[order].tolist(), abs=1e-5)
    top = policy.beam_search(5)
    assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert top[0][0] == every[order[0]].tolist()


def test_reinforce_finds_the_best_architecture():
    # Toy reward: the fraction of decisions equal to a hidden best architecture.
    best = torch.tensor([2, 0, 3, 1])
    policy = controller(4)
    trainer = Reinforce(policy, lr=0.05, entropy_weight=1e-4)
    generator = torch.Generator().manual_seed(5)
    for _ in range(150):
        rollout = policy.sample(16, generator)
        trainer.step(rollout, (rollout.archs == best).float().mean(1))
    arch, _ = policy.beam_search(1)[0]
    assert arch == best.tolist()
    assert policy.evaluate(best).log_prob.exp().item() > 0.5


def test_reinforce_baseline_and_state():
    policy = controller()
    trainer = Reinforce(policy, baseline_decay=0.5)
    rollout = policy.sample(4, torch.Generator().manual_seed(0))
    stats = trainer.step(rollout, [1.0, 1.0, 1.0, 1.0])
    assert trainer.baseline == 1.0 and stats["reward"] == 1.0  # the first reward starts it
    trainer.step(policy.sample(4), 0.0)
    assert trainer.baseline == 0.5
    state = trainer.state_dict()
    other = Reinforce(controller(9), baseline_decay=0.5)
    other.load_state_dict(state)
    assert other.baseline == 0.5
    assert all(torch.equal(a, b) for a, b in zip(other.controller.parameters(), policy.parameters()))
    with pytest.raises(ValueError, match="rewards must be finite"):
        trainer.step(policy.sample(2), [float("nan"), 1.0])
    with pytest.raises(ValueError, match="baseline_decay must be in"):
        Reinforce(policy, baseline_decay=1.0)


def test_leave_one_out_baseline():
    # Each arch against the mean of the others: a hand computation of the advantage.
    policy = controller()
    trainer = Reinforce(policy, baseline="leave_one_out", entropy_weight=0.0)
    rollout = policy.sample(4, torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.2, 0.5, 0.1, 0.6])
    advantage = torch.stack([rewards[i] - torch.cat([rewards[:i], rewards[i + 1:]]).mean() for i in range(4)])
    expected = torch.autograd.grad(-(advantage * rollout.log_prob).mean(), list(policy.parameters()),
                                   retain_graph=True, allow_unused=True)
    trainer.optimizer.step = lambda: None  # keep the gradients to compare
    trainer.step(rollout, rewards)
    for grad, param in zip(expected, policy.parameters()):
        assert (grad is None) == (param.grad is None)
        assert grad is None or torch.allclose(param.grad, grad, atol=1e-7)


@pytest.mark.parametrize("options", OPTIONS)
def test_the_host_gradient_is_autograds_through_the_policy(options):
    # likelihood_backward's NumPy backward against autograd through evaluate (float64, a policy
    # far from uniform), with every option's weights; then accumulated onto a gradient there.
    policy = sharp_policy(options, 5)
    archs = policy.sample_archs(6, torch.Generator().manual_seed(2))
    grad_log_prob = torch.tensor([0.3, -1.0, 0.5, 2.0, 0.1, -0.4], dtype=torch.float64)
    grad_entropy = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    rollout = policy.evaluate(archs)
    names, params = zip(*policy.named_parameters())
    want = torch.autograd.grad((grad_log_prob * rollout.log_prob).sum() + (grad_entropy * rollout.entropy).sum(),
                               params, allow_unused=True)
    log_prob, entropy = policy.likelihood_backward(archs, grad_log_prob.tolist(), grad_entropy.tolist())
    torch.testing.assert_close(log_prob, rollout.log_prob.detach())
    torch.testing.assert_close(entropy, rollout.entropy.detach())
    for name, param, grad in zip(names, params, want, strict=True):
        assert (param.grad is None) == (grad is None), name  # the last decision's embedding is never read
        if grad is not None:
            torch.testing.assert_close(param.grad, grad, msg=name)
    kept = [None if p.grad is None else p.grad.clone() for p in params]
    policy.likelihood_backward(archs, grad_log_prob.tolist(), grad_entropy.tolist())
    for name, param, grad in zip(names, params, kept):
        if grad is not None:
            torch.testing.assert_close(param.grad, 2 * grad, msg=name)


def test_a_kept_draw_gives_the_gradient_of_running_the_policy_again():
    # sample_archs(keep=True) keeps the draw's forward: the backward of those archs is the same to
    # the bit as after running the policy again; after an update (or for other archs) it is not used.
    def grads(policy):
        return [None if p.grad is None else p.grad.clone() for p in policy.parameters()]

    policy = controller(5, choices=(4,) * 6)
    archs = policy.sample_archs(4, torch.Generator().manual_seed(1), keep=True)
    policy.likelihood_backward(archs, [0.5, -0.2, 0.1, 0.3], [-0.01] * 4)
    kept = grads(policy)
    policy.zero_grad()
    policy.likelihood_backward(archs, [0.5, -0.2, 0.1, 0.3], [-0.01] * 4)  # nothing kept now: run again
    for a, b in zip(kept, grads(policy), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    policy.zero_grad()
    archs = policy.sample_archs(4, torch.Generator().manual_seed(2), keep=True)
    with torch.no_grad():
        policy.heads[0].bias.add_(1.0)  # an update after the draw: the kept forward is stale
    policy.likelihood_backward(archs, [0.5, -0.2, 0.1, 0.3], [-0.01] * 4)
    after = grads(policy)
    policy.zero_grad()
    policy.likelihood_backward(archs, [0.5, -0.2, 0.1, 0.3], [-0.01] * 4)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after, grads(policy)))


def test_the_policy_runs_numpys_blas_on_one_thread(monkeypatch):
    # A BLAS whose idle threads spin after a call takes the cores from torch's threads (a search on
    # two threads ran 40% slower): the draw and the update hold it to one, and restore it after.
    from threadpoolctl import threadpool_info

    from apsfast.search import host_policy

    def blas_threads() -> list[int]:
        return [m["num_threads"] for m in threadpool_info() if m["user_api"] == "blas"]

    seen = []
    for name in ("unroll", "backward"):
        original = getattr(host_policy, name)

        def spy(*args, original=original, **kwargs):
            seen.append(blas_threads())
            return original(*args, **kwargs)
        monkeypatch.setattr(host_policy, name, spy)
    before = blas_threads()
    policy = controller()
    Reinforce(policy).step(policy.sample_archs(2, torch.Generator().manual_seed(0)), [0.5, 0.7])
    assert len(seen) == 3 and all(threads == [1] * len(before) for threads in seen)
    assert blas_threads() == before


def test_likelihood_backward_errors():
    policy = controller()
    with pytest.raises(ValueError, match=r"grad_log_prob and grad_entropy must be \[2\], one per arch"):
        policy.likelihood_backward([[0, 0, 0, 0], [1, 1, 1, 1]], [1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"archs\[0, 3\] = 3 is out of range: decision 3 has 3 candidates"):
        policy.likelihood_backward([[0, 0, 0, 3]], [1.0], [0.0])
    with pytest.raises(ValueError, match=r"archs must be \[B, 4\] candidate indices"):
        policy.likelihood_backward(torch.zeros(2, 4), [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"rewards must be one per arch \(2\) or one for all, got 3"):
        Reinforce(policy).step(torch.zeros(2, 4, dtype=torch.long), [1.0, 0.0, 1.0])


def test_a_policy_step_and_a_sample_dispatch_a_handful_of_ops():
    # The update's gradient is the host's: beside the fused Adam (and the profiler's marks
    # around it), nothing; a sample is its noise. As torch ops: ~100 an update, ~20 a decision.
    from apsfast.benchmarks.common import count_ops
    policy = controller(2, choices=(4,) * 13 + (3,) * 6)
    trainer = Reinforce(policy, baseline="leave_one_out")
    archs = policy.sample_archs(4, torch.Generator().manual_seed(0))
    rewards = [0.2, 0.5, 0.1, 0.6]
    trainer.step(archs, rewards)  # the optimizer's state made
    cpu = torch.device("cpu")
    assert count_ops(lambda: trainer.step(archs, rewards), cpu)[0] <= 8  # 108 through autograd
    assert count_ops(lambda: policy.sample_archs(4), cpu)[0] <= 6


def test_leave_one_out_ignores_how_hard_the_batch_is():
    # The same archs scored on an easier batch (every reward + 0.3) take the same step; with the
    # moving average the step changes (by ~2e-2 here).
    def after(baseline: str, offset: float) -> list[torch.Tensor]:
        policy = controller(3)
        trainer = Reinforce(policy, lr=0.01, baseline=baseline)
        generator = torch.Generator().manual_seed(1)
        trainer.step(policy.sample(4, generator), [0.5, 0.5, 0.5, 0.5])
        trainer.step(policy.sample(4, generator), torch.tensor([0.2, 0.4, 0.3, 0.1]) + offset)
        return [p.detach().clone() for p in policy.parameters()]

    for a, b in zip(after("leave_one_out", 0.0), after("leave_one_out", 0.3)):
        assert torch.allclose(a, b, atol=1e-4)  # float rounding of the shifted rewards, through Adam
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(after("moving_average", 0.0),
                                                                     after("moving_average", 0.3)))
    with pytest.raises(ValueError, match="leave_one_out baseline needs at least 2"):
        Reinforce(controller(), baseline="leave_one_out").step(controller().sample(1), [1.0])
    with pytest.raises(ValueError, match="baseline must be one of moving_average, leave_one_out"):
        Reinforce(controller(), baseline="mean")


def test_flops_reward():
    assert flops_reward(0.9, 50e6, None) == 0.9
    assert flops_reward(0.9, 20e6, 40e6) == 0.9  # α = 0: under the target, no penalty
    assert flops_reward(0.9, 80e6, 40e6) == pytest.approx(0.9 * 2 ** -0.1)
    assert flops_reward(0.9, 20e6, 40e6, alpha=-0.1) == pytest.approx(0.9 * 0.5 ** -0.1)
    with pytest.raises(ValueError, match="target must be a finite float > 0"):
        flops_reward(0.9, 20e6, 0)
