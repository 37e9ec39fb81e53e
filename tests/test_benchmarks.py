"""The benchmark CLIs run end to end (tiny shapes, one untimed round), and what they count is right."""
import argparse
import json
import math

import pytest
import torch

from apsfast.benchmarks import kernels


def test_kernel_benchmark_quick(tmp_path, capsys):
    assert kernels.main(["--quick", "--out", str(tmp_path / "cpu")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    tables = {row["table"] for row in rows}
    assert tables == {"conv", "grouped", "transition"}
    assert all(row["command"].startswith("apsfast bench kernels") for row in rows)
    text = (tmp_path / "cpu.md").read_text()
    assert "aps/limit: median" in text and "per_layer/batched" in text


def test_benchmark_layers_come_from_the_search_spaces():
    sweep = kernels.conv_sweep(quick=False)
    first = kernels.conv_shape("resnet20", "layer1.1.conv1", 8)
    assert first in sweep and (first.in_widths, first.hw, first.kernel) == ((16, 32, 64, 96), 32, 3)
    dw = kernels.conv_shape("mobilenetv2", "stage2.1.layers.3", 8)
    assert dw.depthwise and dw.hw == 56 and dw.in_widths == (72, 108, 144, 180)
    layers, in_widths = kernels.network_layers("resnet20", "meta", None)
    assert len(layers) == 22 and in_widths[:2] == [3, 96]  # 19 convs, 2 stage projections, classifier
    every, _ = kernels.network_layers("resnet20", "meta", None, every_layer=True)
    assert len(every) == 29  # + the 7 block projections the widest arch does not use


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_host_benchmark_quick(tmp_path, capsys):
    # apsfast bench host --quick end to end: width ×0.25, one untimed round, no compilation.
    from apsfast.benchmarks import host
    assert host.main(["--quick", "--out", str(tmp_path / "host")]) == 0
    [row] = _rows(tmp_path / "host.jsonl")
    assert row["command"] == f"apsfast bench host --quick --out {tmp_path / 'host'}"
    assert (row["width"], row["batch"], row["image_size"], row["candidates"]) == (0.25, 2, 8, [4, 8, 16, 24])
    for name in ("static", "weight", "weight+transition", "transition", "construction", "controller", "scoring",
                 "search step"):
        assert row[f"t_{name}"] > 0
    assert "t_static compiled" not in row and row["compile_error"].startswith("not timed")
    assert 20 <= row["construction_layers"] <= 29  # 19 convs, the classifier, the projections the arch uses
    assert row["construction_macs"] > 0 and row["gemm_flops"] > 0
    text = (tmp_path / "host.md").read_text()
    for column in ("| static ms | static compiled ms | weight ms | weight+transition ms | transition ms | "
                   "construction ms | controller ms | scoring ms | search step ms |",
                   "| weight/static | (weight+transition)/static | construction/static | controller/static "
                   "| scoring/static | (search step)/static |",
                   "construction MMAC / step",
                   "construction ms at GEMM rate"):
        assert column in text
    assert host.TARGET in text and "float32 GEMM rate" in text
    # Op counts of every provider; the controller's step is its scoring forward and more.
    assert sum(row["ops_controller"]) > sum(row["ops_scoring"]) > 0 and row["ops_transition"][1] == 0
    assert "| controller − scoring |" in text and "controller ops − scoring ops" in text
    printed = capsys.readouterr().out
    assert "# Host-cost benchmark (cpu)" in printed and host.TARGET in printed


def test_count_ops_splits_by_device():
    from apsfast.benchmarks.common import count_ops
    x = torch.ones(3)

    def two_ops() -> None:
        x.add(1).mul_(2)
    assert count_ops(two_ops, torch.device("cpu")) == (2, 0)
    assert count_ops(two_ops, torch.device("meta")) == (0, 2)  # what a GPU run's host does


def test_construction_macs_count_the_reference_products():
    # build_macs × kernel elements × 2 (forward, the backward's dW) is what the reference's
    # construction and its dW multiply, counted by torch's FLOP counter (2 FLOP per MAC).
    from torch.utils.flop_counter import FlopCounterMode

    from apsfast import reference
    from apsfast.benchmarks.host import build_macs
    from apsfast.nn import APSConv2d, APSLinear
    layers = [APSConv2d((3,), (4, 8, 12), 3), APSConv2d((4, 8, 12), (4, 8, 12), 3), APSConv2d((8, 16), (4, 8), 1),
              APSLinear((4, 8, 12), 10)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        for o, c_o in enumerate(layer.out_widths):
            for i, c_i in enumerate(layer.in_widths):
                P = None if layer.P is None else layer.P[o]
                Q = None if layer.Q is None else layer.Q[i]
                with FlopCounterMode(display=False) as counter:
                    kernel = reference.construct(layer.weight, P, Q)
                    reference.construct_backward(torch.ones_like(kernel), layer.weight, P, Q, True, False, False)
                elements = layer.weight[0, 0].numel()
                assert counter.get_total_flops() == 2 * 2 * elements * build_macs(layer, c_o, c_i), (layer, c_o, c_i)


def test_search_benchmark_quick(tmp_path, monkeypatch, one_thread):
    # apsfast bench search --quick on ResNet-20 at a given batch size, the compiled limit
    # asked for: a compiler that fails is recorded in the row, the column left empty.
    from apsfast.benchmarks import search

    def failing_compile(model, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no compiler here\nmore")
        return type("Failing", (), {"training": False, "train": lambda self: None,
                                    "__call__": lambda self, *a, **k: call()})()
    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "search"
    assert search.main(["--quick", "--models", "resnet20_cifar", "--batches", "2", "--rounds", "1", "--compile",
                        "--out", str(out)]) == 0
    rows = _rows(out.with_suffix(".jsonl"))
    assert [(r["model"], r["batch"]) for r in rows] == [("resnet20_cifar", 2)]
    for row in rows:
        for name in ("apsfast", "plain", "limit", "weight", "transition", "controller"):
            assert row[f"t_{name}"] > 0
        assert row["weight/limit"] == row["t_weight"] / row["t_limit"]
        assert row["compile_error"] == "RuntimeError: no compiler here / more"
        assert "t_limit compiled" not in row and "mem_apsfast" not in row  # quick: no memory profile
    text = out.with_suffix(".md").read_text()
    assert "| limit ms | limit compiled ms | apsfast ms | weight ms | transition ms | controller ms |" in text
    assert "| apsfast/limit | weight/limit | apsfast/limit compiled |" in text
    assert "weight/limit at batch 64, width ×1: not measured (target ≤ 1.05 on a CPU)" in text
    assert "(target ≤ 1.15 on a GPU)" in text and "limit compiled, resnet20_cifar@16 b2 w×0.5: RuntimeError" in text


def test_search_sweep_batches():
    from apsfast.benchmarks import search
    cases = search.sweep(False, "cpu", batches=[16, 64])
    assert [(c.model, c.batch, c.width) for c in cases] == [
        ("resnet20_cifar", 16, 1.0), ("resnet20_cifar", 64, 1.0),
        ("mobilenetv2_imagenet", 16, 1.0), ("mobilenetv2_imagenet", 64, 1.0)]
    assert {c.width for c in search.sweep(False, "cuda")} == {0.5, 1.0, 2.0}  # the default sweep keeps them
    assert [c.batch for c in search.sweep(False, "cuda", ["mobilenetv2_imagenet"], [256])] == [256]
    assert search.batch_list("64, 256,1024") == [64, 256, 1024]
    for bad in ("", "a,2", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            search.batch_list(bad)


def test_transition_precision_benchmark_forces_each_backend(scoped):
    """The GPU script's precision stage (apsfast bench precision): each backend is forced for
    its provider only, and two backends' float32 paths of Φ agree, so a drift it reports is the precision's."""
    from apsfast._backends import ENV_VAR, forced
    from apsfast.benchmarks import precision as bench

    scoped.setenv(ENV_VAR, "cpu")
    with bench.backend("reference"):
        assert forced() == "reference"
    with bench.backend("default"):
        assert forced() is None
    assert forced() == "cpu"
    worst, (start, end) = bench.drift("cpu", [("cpu", "highest"), ("reference", "highest")], steps=3, tau=5e-3)
    assert worst[("cpu", "highest")] == 0.0
    assert worst[("reference", "highest")] < 1e-5
    assert end < start


def test_meta_width_and_transition_every_benchmarks(one_thread):
    # apsfast bench meta-width's row on the CIFAR space, and transition-every's path of Φ.
    from apsfast.benchmarks import meta_width, transition_every
    row = meta_width.row("resnet20_cifar", "widest", reps=1)
    assert row["transforms_mb"] > 0 and row["transition_ms"] > 0
    assert 0 < row["phi_floor"] < row["phi_start"]
    phis, seconds = transition_every.trajectory("demo", steps=8, every=2)
    assert len(phis) == len(transition_every.MARKS) and seconds > 0
    assert all(math.isfinite(phi) and phi > 0 for phi in phis)
