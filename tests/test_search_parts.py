"""The search's parts that need no data: config, strategies, arch selection, checkpoints,
metrics, plots."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from apsfast import models
from apsfast.search import strategies
from apsfast.search.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from apsfast.search.config import Config, ConfigError, presets
from apsfast.search.result import against_top, select_arch
from apsfast.search.steps import batch_statistics, sgd
from apsfast.search.metrics import MetricsLog, read_metrics
from apsfast.search.settings import apply_overrides, config_from_dict, load_config

PAPER_PRESETS = ("resnet20_cifar", "resnet56_cifar", "resnet18_imagenet", "mobilenetv2_imagenet")


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_load_with_the_papers_settings(name):
    config = load_config(name)
    assert config.model.name == name
    assert config.sharing.strategy == "transitional" and config.sharing.tau is None  # steered over the phase
    cifar = name.endswith("cifar")
    assert (config.train.epochs, config.train.warmup_epochs) == ((600, 200) if cifar else (160, 80))
    assert config.controller.lr == 1.6e-4 and config.controller.betas == [0.5, 0.999]
    assert config.data.val_fraction == 0.5
    assert config.reward.alpha == 0.0 and config.reward.beta == -0.1


def test_every_preset_is_listed_and_valid():
    assert set(PAPER_PRESETS) | {"demo"} <= set(presets())
    for name in presets():
        load_config(name)


def test_overrides_are_typed_and_win_over_the_preset(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train: {epochs: 9, warmup_epochs: 3}\nmodel: {options: {residual: stage}}\n")
    config = load_config("resnet20_cifar", file, ["train.lr=5e-2", "reward.flops_target=20.4M",
                                                   "model.options.widths=[8, 16]", "run.progress=false"])
    assert (config.train.epochs, config.train.warmup_epochs, config.train.lr) == (9, 3, 0.05)
    assert config.reward.flops_target == 20.4e6
    # options merge key by key: the file's residual and the preset's widths override survive
    assert config.model.options == {"widths": [8, 16], "residual": "stage"}
    assert config.run.progress is False
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.digest() == config.digest()
    assert apply_overrides(again, ["train.lr=0.01"]).digest() != config.digest()


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown field 'train.lrr'"),
    ("nosuch.x=1", "unknown field 'nosuch'"),
    ("train.epochs=ten", "train.epochs must be an int, got 'ten'"),
    ("train.epochs=2.5", "train.epochs must be an int"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.lr=1M", "train.lr must be a finite number, got '1M'"),
    ("train.warmup_epochs=600", "train.warmup_epochs must be in [0, train.epochs=600)"),
    ("sharing.strategy=slimmable", "sharing.strategy must be one of ordinal, independent, transitional, learned"),
    ("sharing.tau=0", "sharing.tau must be > 0"),
    ("sharing.transition_fall=1", "sharing.transition_fall must be a fraction 0 < x < 1, got 1"),
    ("sharing.transition_end=0", "sharing.transition_end must be a fraction 0 < x ≤ 1, got 0"),
    ("model.name=vgg", "model.name must be one of"),
    ("model.options.depth=3", "unknown option(s) ['depth']"),
    ("model.options.sharing=ordinal", "model.options may not set ['sharing']"),
    ("data.name=mnist", "data.name must be one of"),
    ("data.val_fraction=1", "data.val_fraction must be in (0, 1)"),
    ("controller.betas=[0.5]", "controller.betas must be two numbers"),
    ("controller.baseline=mean", "controller.baseline must be one of moving_average, leave_one_out, got 'mean'"),
    ("controller.baseline=leave_one_out", "controller.samples must be ≥ 2, got 1"),
    ("train.widest_every=-2", "train.widest_every must be an integer ≥ 0 (0: never), got -2"),
    ("sharing.transition_precision=low", "sharing.transition_precision must be null or one of highest, high, medium, got 'low'"),
    ("sharing.transition_every=0", "sharing.transition_every must be an integer ≥ 1 (1: a transition step after every weight step), got 0"),
    ("reward.flops_target=lots", "reward.flops_target must be a finite number, got 'lots'"),
    ("run.device=tpu", "run.device must be one of auto, cpu, cuda"),
    ("result.select=best", "result.select must be one of likely, closest, got 'best'"),
    ("run.progress=1", "run.progress must be a bool"),
    ("train", "an override must be SECTION.KEY=VALUE"),
])
def test_bad_fields_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("resnet20_cifar", overrides=[override])
    assert message in str(info.value)


def test_bad_preset_and_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'resnet21'"):
        load_config("resnet21")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="the config must be a mapping"):
        load_config(file=tmp_path / "list.yaml")


# --- strategies ----------------------------------------------------------------------------

def tiny(strategy: str) -> models.Supernet:
    torch.manual_seed(0)
    return models.build("resnet20_cifar", widths=[2, 4], input_size=8,
                        sharing=strategies.supernet_sharing(strategy), dtype=torch.float64)


def matrices(net) -> list[torch.Tensor]:
    return [m.detach().clone() for m in strategies.transform_parameters(net)]


@pytest.mark.parametrize("strategy", ["ordinal", "independent"])
def test_fixed_strategies_never_move_the_transforms(strategy):
    net = tiny(strategy)
    before = matrices(net)
    strategies.begin_search(net, strategy)
    for step in (None, 1):
        assert strategies.after_weight_step(net, strategy, 1e-2, step) is None
    assert all(torch.equal(a, b) for a, b in zip(before, matrices(net)))
    assert not any(m.requires_grad for m in strategies.transform_parameters(net))


def test_aps_o_and_aps_t_run_one_warm_up_to_the_bit():
    # float32, where a convolution rounds a strided slice of a wider meta-weight differently: the
    # two would part within a few steps, and a comparison of the strategies would compare two
    # networks instead of measuring the transition. The demo's widths: torch's fused SGD rounds
    # the last (size mod 8 or 16) entries of a tensor on a scalar path, and with these widths
    # those entries lie outside the block APS-O and APS-T share (with [2, 4, 6] they do not,
    # and the two part by an ulp at step 6).
    nets, optimizers = {}, {}
    for strategy in ("ordinal", "transitional"):
        torch.manual_seed(0)
        nets[strategy] = models.build("resnet20_cifar", widths=[4, 8, 16], input_size=8,
                                      sharing=strategies.supernet_sharing(strategy))
        optimizers[strategy] = sgd(nets[strategy].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                   nesterov=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        x, y = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        arch = nets["ordinal"].sample_uniform(generator) if step % 2 else nets["ordinal"].max_arch()
        losses = []
        for strategy, net in nets.items():
            net.set_arch(arch)
            loss = F.cross_entropy(net(x), y)
            optimizers[strategy].zero_grad()
            loss.backward()
            optimizers[strategy].step()
            losses.append(loss.item())
        assert losses[0] == losses[1], (step, losses)


def test_the_transitions_start_noise_has_a_generator_of_its_own():
    # The seed fixes the perturbation, and the global stream (the controller's draws) is left
    # where APS-O leaves it.
    starts = []
    for seed in (5, 5, 6):
        net = tiny("transitional")
        torch.manual_seed(1)
        strategies.begin_search(net, "transitional", seed)
        starts.append((matrices(net), torch.rand(3)))
        assert not any(side.is_selection() for side in net._sides)
    assert all(torch.equal(a, b) for a, b in zip(starts[0][0], starts[1][0]))
    assert not all(torch.equal(a, b) for a, b in zip(starts[0][0], starts[2][0]))
    torch.manual_seed(1)
    untouched = torch.rand(3)
    assert all(torch.equal(after, untouched) for _, after in starts)
    before = matrices(net)
    strategies.begin_search(net, "transitional", 7)  # once perturbed, never again
    assert all(torch.equal(a, b) for a, b in zip(before, matrices(net)))


def test_transitional_is_frozen_in_warmup_then_phi_falls():
    net = tiny("transitional")
    start = strategies.sharing_level(net)
    before = matrices(net)
    assert strategies.after_weight_step(net, "transitional", 0.05, None) is None
    assert all(torch.equal(a, b) for a, b in zip(before, matrices(net)))  # warm-up: frozen
    phis = [float(strategies.after_weight_step(net, "transitional", 0.05, step)) for step in range(1, 61)]
    assert phis[0] == pytest.approx(start, rel=1e-3)  # the perturbed start
    # the first step leaves the exact ordinal start (a stationary point): then Φ falls steadily
    assert strategies.sharing_level(net) < 0.6 * start
    assert all(b <= a + 1e-9 for a, b in zip(phis[1:], phis[2:]))
    for m in strategies.transform_parameters(net):  # columns stay on the unit sphere
        torch.testing.assert_close(m.norm(dim=0), torch.ones(m.shape[1], dtype=m.dtype))


def test_transition_every_k_steps_takes_k_tau_once():
    net, twin = tiny("transitional"), tiny("transitional")
    torch.manual_seed(3)
    stepped = [strategies.after_weight_step(net, "transitional", 0.01, step, every=3) for step in range(1, 7)]
    assert [phi is not None for phi in stepped] == [False, False, True, False, False, True]
    torch.manual_seed(3)
    for _ in range(2):
        strategies.transition(twin, 0.03)
    assert all(torch.equal(a, b) for a, b in zip(matrices(net), matrices(twin)))


def test_the_transition_precision_holds_for_the_step_only():
    net, twin = tiny("transitional"), tiny("transitional")
    before = torch.get_float32_matmul_precision()
    torch.manual_seed(3)
    strategies.after_weight_step(net, "transitional", 0.01, 1, precision="highest")
    assert torch.get_float32_matmul_precision() == before
    torch.manual_seed(3)
    strategies.transition(twin, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(matrices(net), matrices(twin)))


def test_learned_trains_the_transforms_by_the_task_loss_after_warmup():
    net = tiny("learned")
    before = matrices(net)
    assert strategies.after_weight_step(net, "learned", 1e-2, 1) is None  # no transition
    assert not any(m.requires_grad for m in strategies.transform_parameters(net))  # frozen in warm-up
    strategies.begin_search(net, "learned")
    params = strategies.transform_parameters(net)
    assert all(m.requires_grad for m in params)
    net.set_arch(net.sample_uniform(torch.Generator().manual_seed(3)))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(net(x), y).backward()
    grads = [m.grad for m in params if m.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, matrices(net)))


def test_strategy_names_are_checked():
    with pytest.raises(ValueError, match="strategy must be one of"):
        strategies.supernet_sharing("slimmable")


def test_batch_statistics_leaves_running_statistics_alone():
    net = tiny("ordinal")
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with batch_statistics(net):
        out = net(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert net.training and out.shape == (8, 10)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_batch_statistics_turns_dropout_off_and_restores_every_module_as_it_was():
    untracked = torch.nn.BatchNorm1d(4, track_running_stats=False)
    frozen = torch.nn.BatchNorm1d(4).eval()  # a module the user left in eval mode
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), frozen, untracked)
    net.train()
    frozen.eval()
    x = torch.randn(16, 4)
    with batch_statistics(net):
        assert not net[1].training  # dropout off: two passes agree
        torch.testing.assert_close(net(x), net(x))
        assert frozen.training and not frozen.track_running_stats  # batch statistics, nothing tracked
        batch_mean = net[0](x).mean(0)
    assert [m.training for m in net] == [True, True, False, True] and net.training
    assert frozen.track_running_stats and not untracked.track_running_stats
    assert torch.equal(frozen.running_mean, torch.zeros(4)) and batch_mean.abs().sum() > 0


# --- arch selection ------------------------------------------------------------------------

def cand(flops, loglik):
    return {"flops": flops, "loglik": loglik, "probability": math.exp(loglik)}


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_the_fused_sgd_takes_the_loops_steps_when_parameters_join_late(nesterov):
    # A supernet's parameter may get its first gradient long after the others (an arch that
    # first uses it), where torch's fused SGD alone would refuse a mix of buffers.
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    grads = [[torch.randn(t.shape, generator=generator) for t in start] for _ in range(4)]
    settings = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    finals = []
    for make in (lambda ps: sgd(ps, **settings), lambda ps: torch.optim.SGD(ps, foreach=False, **settings)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make(params)
        for step, g in enumerate(grads):
            optimizer.zero_grad(set_to_none=True)
            for i, (p, gi) in enumerate(zip(params, g)):
                if i == 0 or step >= 2:  # the second parameter joins at step 2
                    p.grad = gi.clone()
            optimizer.step()
        finals.append([p.detach() for p in params])
    assert sgd([torch.nn.Parameter(start[0])], **settings).param_groups[0]["fused"]
    for fused, loop in zip(*finals):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_of_the_loop_sgd_goes_on_with_the_loop():
    # It holds buffers only for the parameters that had a gradient, which the fused SGD refuses.
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    loop = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(3)
    loop.step()
    optimizer = sgd(params, lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.load_state_dict(loop.state_dict())
    assert not optimizer.param_groups[0]["fused"]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    torch.testing.assert_close(params[1].detach(), torch.full((2,), 0.9))


def test_select_arch_takes_the_most_likely_or_the_closest_within_the_target():
    beam = [cand(90, -1.0), cand(50, -1.5), cand(80, -2.0), cand(80, -1.8), cand(120, -0.5)]
    assert select_arch(beam, None)[0] == 0
    assert select_arch(beam, 85)[0] == 1  # the default, likely: the first within, 50 MACs at rank 1
    assert select_arch(beam, 85, rule="closest")[0] == 3  # 80 MACs, the more likely of the two
    assert select_arch(beam, 90, rule="closest")[0] == select_arch(beam, 90)[0] == 0
    for rule in ("likely", "closest"):
        index, why = select_arch(beam, 40, rule=rule)
        assert index == 1 and "no arch of the beam is within" in why  # none within: the cheapest
    with pytest.raises(ValueError, match="rule must be one of likely, closest, got 'best'"):
        select_arch(beam, 85, rule="best")


def test_a_chosen_arch_is_shown_beside_the_top_one_and_an_unlikely_one_warned_of():
    beam = [cand(90, math.log(0.9)), cand(50, math.log(0.05)), cand(80, math.log(0.005))]
    assert against_top(beam, 0) == {}
    near = against_top(beam, 1)
    assert near["line"] == ("chosen: rank 1 of the beam, probability 0.05, 5e-05M MACs; the policy's top arch: "
                            "rank 0, probability 0.9, 9e-05M MACs") and "warning" not in near
    far = against_top(beam, 2)
    assert far["probability_ratio"] == pytest.approx(0.005 / 0.9) and "under 1%" in far["warning"]


# --- checkpoints and metrics -----------------------------------------------------------------

def test_checkpoint_round_trip_and_refusals(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"kind": "search", "model": "m", "w": torch.arange(3), "nested": {"a": [1, 2.5, None]}})
    state = load_checkpoint(path, expect={"model": "m"})
    assert torch.equal(state["w"], torch.arange(3)) and state["nested"] == {"a": [1, 2.5, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="is for model 'm', this run has 'other'"):
        load_checkpoint(path, expect={"model": "other"})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CheckpointError, match="not a readable apsfast checkpoint"):
        load_checkpoint(path)
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="checkpoint format 99, expected 1"):
        load_checkpoint(path)


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": 1, "x": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_metrics_log_truncates_to_an_offset(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"kind": "step", "step": 1, "loss": 1.0})
    offset = log.offset()
    log.write({"kind": "step", "step": 2, "loss": float("nan")})
    assert read_metrics(tmp_path / "m.jsonl")[1]["loss"] is None
    log.truncate(offset)
    log.write({"kind": "epoch", "step": 3})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 3]
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl", kind="epoch")] == [3]


def test_plots_are_written(tmp_path):
    from apsfast.search.plots import plot_curves, plot_decisions
    epochs = [{"epoch": e, "phase": "warmup" if e < 2 else "search", "train_acc": 0.1 * e, "val_acc": 0.1 * e,
               "phi": 100.0 / (e + 1), "probs": [[0.5, 0.5], [0.2, 0.8]]} for e in range(5)]
    decisions = [{"name": "stem", "widths": [2, 4]}, {"name": "layer1", "widths": [2, 4]}]
    for path in (plot_curves(epochs, tmp_path / "c.png"), plot_decisions(epochs, decisions, tmp_path / "d.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decisions_with_candidates_of_their_own_get_a_legend_each(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from apsfast.search.plots import plot_decisions
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    epochs = [{"epoch": e, "phase": "search", "probs": [[0.5, 0.5], [0.2, 0.3, 0.5]]} for e in range(3)]
    decisions = [{"name": "stem.0", "widths": [8, 16]}, {"name": "block.0", "widths": [12, 24, 32]}]
    plot_decisions(epochs, decisions, tmp_path / "d.png", title="a converted model")
    (fig,) = figures
    assert not fig.legends
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes] == [["8", "16"], ["12", "24", "32"]]
    same = [{"name": "a", "widths": [2, 4]}, {"name": "b", "widths": [2, 4]}]
    plot_decisions([{"epoch": 0, "phase": "search", "probs": [[0.5, 0.5]] * 2}], same, tmp_path / "e.png")
    assert [t.get_text() for t in figures[1].legends[0].get_texts()] == ["2", "4"]
    assert all(ax.get_legend() is None for ax in figures[1].axes)


def test_config_defaults_are_the_authors():
    config = Config()
    assert (config.train.lr, config.train.momentum, config.train.weight_decay, config.train.batch_size) == \
        (0.1, 0.9, 2e-4, 256)
    assert (config.controller.baseline_decay, config.controller.entropy_weight) == (0.99, 4e-3)
