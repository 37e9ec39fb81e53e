"""The paper's analysis: the measurements against hand computations, the search hook (right
steps, no effect on the result), ``apsfast analyze`` and the top-N / uniform retrains."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from apsfast import cli, models
from apsfast.analysis import measure, plots
from apsfast.nn import APSConv2d, aps_layers
from apsfast.search import Search, load_config
from apsfast.search.metrics import read_metrics
from apsfast.search.baselines import uniform_arch

from test_search import TINY  # 3 epochs (1 warm-up) of 3 steps of 32 images
ANALYSIS = ["analysis.every=2", "analysis.pairs=2", "analysis.samples=3"]


def quiet(text: str) -> None:
    pass


def run_search(folder: Path, *more: str) -> dict:
    return Search(load_config("demo", overrides=[*TINY, *more]), folder, log=quiet).run()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny searches: APS-T with and without the analysis, APS-O with it."""
    root = tmp_path_factory.mktemp("runs")
    folders = {"on": root / "t-on", "off": root / "t-off", "ordinal": root / "o-on"}
    run_search(folders["on"], *ANALYSIS)
    run_search(folders["off"])
    run_search(folders["ordinal"], *ANALYSIS, "sharing.strategy=ordinal")
    return folders


def tiny_net(seed: int = 0) -> models.Supernet:
    torch.manual_seed(seed)
    net = models.build("resnet20_cifar", widths=[2, 4], residual="stage", input_size=8, num_classes=10,
                       sharing="transitional")
    for layer in aps_layers(net):  # dense transforms: every P, Q mixes the meta channels
        layer.begin_transition()
    return net


def test_cosine_matches_flattened_autograd_gradients():
    net = tiny_net()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    a, b = net.min_arch(), net.max_arch()
    running = [m.running_mean.clone() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    g, _ = measure.arch_gradient(net, a, x, y)
    h, _ = measure.arch_gradient(net, b, x, y)
    assert all(p.grad is None for p in net.parameters())  # the run's .grad is never written
    assert all(torch.equal(r, m.running_mean) for r, m in
               zip(running, [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]))

    def flat(arch):  # by hand: backward into .grad with batch statistics, flatten every meta-weight
        net.zero_grad(set_to_none=True)
        net.set_arch(arch)
        net.eval()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
        F.cross_entropy(net(x), y).backward()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = True
        return torch.cat([torch.zeros_like(layer.weight).flatten() if layer.weight.grad is None
                          else layer.weight.grad.flatten() for layer in aps_layers(net)]).double()

    expected = F.cosine_similarity(flat(a), flat(b), dim=0)
    assert math.isclose(measure.cosine(g, h), float(expected), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(measure.cosine(g, g), 1.0, rel_tol=1e-9)


def test_coupled_norm_against_its_definition():
    torch.manual_seed(0)
    layer = APSConv2d((2, 3), (2, 4), 1, sharing="transitional")
    layer.begin_transition()
    P, Q = layer.P, layer.Q
    G_other = torch.randn(4, 3, 1, 1, dtype=torch.float64)  # ã = (o 1, i 1): gradient on its candidate kernel
    meta = P[1].double() @ G_other[..., 0, 0] @ Q[1].double().t()  # its meta-gradient  P^ã G^ã Q^ãᵀ
    grad = meta[..., None, None]
    # lands on a = (o 0, i 0): ‖P^{aᵀ} P^ã G^ã Q^ãᵀ Q^a‖_F
    expected = (P[0].double().t() @ P[1].double() @ G_other[..., 0, 0] @ Q[1].double().t() @ Q[0].double()).norm()
    assert math.isclose(measure.coupled_norm(layer, [grad], [(1, 1)], [(0, 0)]), float(expected), rel_tol=1e-9)
    # the same candidate is the normal update, not a coupled one
    assert measure.coupled_norm(layer, [grad], [(1, 1)], [(1, 1)]) == 0.0
    # independent selections are disjoint: nothing of ã lands on a where both sides differ
    independent = APSConv2d((2, 3), (2, 4), 1, sharing="independent")
    other = independent.P[1] @ torch.randn(4, 3) @ independent.Q[1].t()
    assert measure.coupled_norm(independent, [other[..., None, None]], [(1, 1)], [(0, 0)]) == 0.0
    assert measure.top2_gaps([[0.1, 0.6, 0.3], [1.0]]) == pytest.approx([0.3, 1.0])


def test_hook_records_at_its_steps_and_changes_nothing(runs):
    records = read_metrics(runs["on"] / "metrics.jsonl", kind="analysis")
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # 9 weight steps, every 2nd, warm-up included
    assert [r["phase"] for r in records] == ["warmup", "search", "search", "search"]
    keys = {"kind", "step", "epoch", "phase", "cos", "coupled_norm", "phi", "acc_mean", "acc_max", "probs", "top2_gap"}
    for r in records:
        assert set(r) == keys and -1 <= r["cos"] <= 1 and r["coupled_norm"] >= 0 and 0 <= r["acc_mean"] <= r["acc_max"]
        assert len(r["probs"]) == len(r["top2_gap"]) and all(math.isclose(sum(p), 1, rel_tol=1e-5) for p in r["probs"])
    assert not read_metrics(runs["off"] / "metrics.jsonl", kind="analysis")
    on, off = (json.loads((runs[k] / "result.json").read_text()) for k in ("on", "off"))
    assert on["candidates"] == off["candidates"] and on["phi"] == off["phi"]
    steps_on, steps_off = (read_metrics(runs[k] / "metrics.jsonl", kind="step") for k in ("on", "off"))
    assert [r["loss"] for r in steps_on] == [r["loss"] for r in steps_off]


def test_analyze_draws_for_one_and_for_two_runs(runs, tmp_path, capsys):
    assert cli.main(["analyze", str(runs["on"])]) == 0
    for name in ("fig3_sharing.png", "fig4_accuracy.png", "fig5_decisions.png"):
        assert (runs["on"] / name).stat().st_size > 10_000
    out = tmp_path / "both"
    assert cli.main(["analyze", str(runs["on"]), str(runs["ordinal"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["fig3_sharing.png", "fig4_accuracy.png",
                                                          "fig5_decisions.png"]
    assert str(out / "fig3_sharing.png") in capsys.readouterr().out


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    message = excinfo.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def test_analyze_bad_input_is_one_line(runs, tmp_path):
    assert "is not a search run" in one_line_error(["analyze", str(tmp_path)])
    assert "no analysis records" in one_line_error(["analyze", str(runs["off"])])
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((runs["on"] / "metrics.jsonl").read_text())
    config = yaml.safe_load((runs["on"] / "config.yaml").read_text())
    config["model"]["options"]["widths"] = [4, 8]
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    assert "different models" in one_line_error(["analyze", str(runs["on"]), str(other)])
    done = subprocess.run([sys.executable, "-m", "apsfast", "analyze", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_top_too_large_is_refused_before_training(runs):
    message = one_line_error(["train", str(runs["off"]), "--top", "99"])
    assert "--top must be in 1..4" in message
    assert not (runs["off"] / "retrain").exists()


def test_retrained_archs_draw_fig_8_and_9_without_analysis_records(runs, tmp_path):
    # Fig. 8-9 read retrains only: a search run without -s analysis.every draws them.
    run = tmp_path / "run"
    shutil.copytree(runs["off"], run)
    (run / "retrain" / "top-1").mkdir(parents=True)
    (run / "retrain" / "top.json").write_text(json.dumps({"n": 2, "archs": [{"test_acc": 0.8}, {"test_acc": 0.7}]}))
    for folder, flops, acc, strategy in (("", 9e5, 0.8, "transitional"), ("top-1", 8e5, 0.75, "transitional")):
        (run / "retrain" / folder / "retrain.json").write_text(
            json.dumps({"flops": flops, "test_acc": acc, "strategy": strategy}))
    written = plots.draw([run], tmp_path / "figures")
    assert sorted(p.name for p in written) == ["fig8_top.png", "fig9_macs.png"]


def test_top_and_uniform_retrains_write_their_json(runs, tmp_path, capsys):
    assert cli.main(["train", str(runs["off"]), "--top", "2", "--out", str(tmp_path / "top")]) == 0
    assert "top-2 archs of the beam: test accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "top" / "top.json").read_text())
    candidates = json.loads((runs["off"] / "result.json").read_text())["candidates"]
    assert saved["n"] == 2 and [a["arch"] for a in saved["archs"]] == [c["arch"] for c in candidates[:2]]
    for k, row in enumerate(saved["archs"], 1):
        summary = json.loads((tmp_path / "top" / f"top-{k}" / "retrain.json").read_text())
        assert summary["arch"] == row["arch"] and summary["test_acc"] == row["test_acc"]
    accs = [row["test_acc"] for row in saved["archs"]]
    assert math.isclose(saved["mean"], sum(accs) / 2) and math.isclose(saved["std"], abs(accs[0] - accs[1]) / 2 ** .5)

    sets = [arg for item in TINY for arg in ("-s", item)]
    assert cli.main(["train", "--uniform", "0.5", "--preset", "demo", *sets, "--out", str(tmp_path / "uniform")]) == 0
    summary = json.loads((tmp_path / "uniform" / "retrain.json").read_text())
    assert summary["strategy"] == "uniform" and set(summary["widths"].values()) == {4}
    net = models.build("resnet20_cifar", device="meta", widths=[2, 4], residual="stage")
    standard = net.standard_widths()  # 16/32/64: half is 8/16/32, the nearest candidate is 4 everywhere
    assert uniform_arch(net, 0.5) == [1] * len(standard) and uniform_arch(net, 0.01) == [0] * len(standard)
