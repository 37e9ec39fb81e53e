"""Latency as a search budget: the per-layer table, its cache, the settings, a search with
``reward.latency_target`` and the benchmark's smoke run. The timers are replaced by
deterministic functions of the op (fast, and the same on every machine) except in the
benchmark's run."""
from __future__ import annotations

import json

import pytest
import torch

from apsfast import models
from apsfast.benchmarks import latency as bench_latency
from apsfast.models import latency
from apsfast.models.latency import REST, LatencyTable, load_or_measure
from apsfast.search import ConfigError, Search, load_config
from apsfast.search.budget import LATENCY
from apsfast.search.searchers import build_searcher
from apsfast.search.searchers.widths import ExpectedMacs
from test_search import quiet, tiny


def fake_op_ms(op, batch, device, repeats=1, warmup=1) -> float:
    """A deterministic 'measurement': proportional to the op's work, plus a per-op overhead."""
    h, w = op.in_hw
    kh, kw = op.kernel_size
    work = op.in_channels * op.out_channels // op.groups * kh * kw * h * w // (op.stride[0] * op.stride[1])
    return 0.01 + batch * work * 1e-7 + (0.002 if op.norm else 0.0)


@pytest.fixture
def fake_timer(monkeypatch):
    """Deterministic op and network timings; ``calls`` counts the op measurements."""
    calls = {"ops": 0}

    def ops_ms(ops, batch, device, *args, **kwargs):
        calls["ops"] += len(ops)
        return {key: latency.Timing(fake_op_ms(op, batch, device), 0.0) for key, op in ops.items()}

    monkeypatch.setattr(latency, "measure_ops", ops_ms)
    monkeypatch.setattr(latency, "measure_network", lambda *args, **kwargs: 1.0)
    return calls


def tiny_net(residual: str = "stage"):
    return models.build("resnet20_cifar", widths=[2, 4], residual=residual, input_size=8)


@pytest.mark.parametrize("residual", ["stage", "block"])
def test_prediction_is_the_sum_of_the_entries_of_every_arch(fake_timer, residual):
    net = tiny_net(residual)
    rng = torch.get_rng_state()
    table = LatencyTable.measure(net, 4, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # measuring changes no seeded run's draws
    measured = fake_timer["ops"]
    assert measured == len(table.entries) > 0
    generator = torch.Generator().manual_seed(0)
    for arch in [net.min_arch(), net.max_arch()] + [net.sample_uniform(generator) for _ in range(40)]:
        ops = table.layer_ops(arch)
        expected = table.rest_ms + sum(table.entries[op.key()] for op in ops.values())
        assert table.predict(arch) == pytest.approx(expected, rel=1e-12)
        parts = table.layer_latency(arch)
        assert parts[REST] == table.rest_ms and sum(parts.values()) == pytest.approx(expected, rel=1e-12)
        # One op per conv (its batch norm folded in) and the classifier; the right shapes.
        convs = [s for s in net.layer_shapes(arch) if s.kind == "conv"]
        assert len(ops) == len(convs) + 1 and all(ops[s.name].norm for s in convs)
        assert all(ops[s.name].key() == latency.Op("conv", s.in_channels, s.out_channels, s.kernel_size, s.stride,
                                                   ops[s.name].padding, (1, 1), 1, ops[s.name].in_hw, False,
                                                   True).key() for s in convs)
    assert table.late == 0 and fake_timer["ops"] == measured  # the enumeration covered every arch's ops
    stride2 = table.layer_ops(net.max_arch())["layer2.0.conv1"]
    assert stride2.in_hw == (8, 8) and stride2.stride == (2, 2) and stride2.padding == (1, 1)
    # The rest: the anchors' measured 1 ms less their entries, the median of the three.
    sums = sorted(1.0 - (table.predict(a) - table.rest_ms) for a in (net.min_arch(), net.standard_arch(),
                                                                      net.max_arch()))
    assert table.rest_ms == pytest.approx(sums[1])
    # TAS's and ISTA's expected cost in milliseconds: exact on a one-hot policy.
    expected = ExpectedMacs(net, table.layer_latency, table.layer_keys)
    arch = net.sample_uniform(generator)
    one_hot = [torch.nn.functional.one_hot(torch.tensor(a), len(d.widths)).double()
               for a, d in zip(arch, net.decisions())]
    assert float(expected(one_hot)) == pytest.approx(table.predict(arch), rel=1e-9)


def test_the_table_is_cached_and_measured_again_for_another_device_or_batch(fake_timer, tmp_path):
    net, path = tiny_net(), tmp_path / LATENCY
    table, note = load_or_measure(path, net, 4, "cpu")
    first = fake_timer["ops"]
    assert first > 0 and path.is_file() and "measured (no table" in note
    again, note = load_or_measure(path, net, 4, "cpu")
    assert fake_timer["ops"] == first and "read from" in note
    arch = net.sample_uniform(torch.Generator().manual_seed(3))
    assert again.predict(arch) == pytest.approx(table.predict(arch), rel=1e-12)
    _, note = load_or_measure(path, net, 8, "cpu")
    assert fake_timer["ops"] == 2 * first and "another batch" in note
    saved = json.loads(path.read_text())
    saved["key"]["device"] = "some other GPU"
    path.write_text(json.dumps(saved))
    _, note = load_or_measure(path, net, 8, "cpu")
    assert fake_timer["ops"] == 3 * first and "another device" in note
    _, note = load_or_measure(path, tiny_net("block"), 8, "cpu")
    assert "another" in note and "decisions" in note and "options" in note
    path.write_text("{not json")
    _, note = load_or_measure(path, net, 8, "cpu")
    assert "damaged" in note and json.loads(path.read_text())["key"]["batch"] == 8


@pytest.mark.parametrize("overrides, message", [
    (["reward.flops_target=20K", "reward.latency_target=2"], "are both set"),
    (["reward.latency_target=-1"], "reward.latency_target must be > 0"),
    (["reward.latency_target=0"], "reward.latency_target must be > 0"),
    (["reward.latency_batch=0"], "reward.latency_batch must be an integer ≥ 1"),
    (["reward.latency_runtime=tensorrt"], "reward.latency_runtime must be one of torch, torch.compile, onnxruntime"),
    (["reward.latency_threads=0"], "reward.latency_threads must be an integer ≥ 1 or null"),
])
def test_latency_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides=overrides)


def test_a_latency_target_below_the_narrowest_arch_stops_before_training(fake_timer, tmp_path):
    with pytest.raises(ConfigError, match="below the predicted latency of the narrowest arch"):
        Search(tiny("reward.latency_target=1e-6"), tmp_path, log=quiet)
    assert (tmp_path / LATENCY).is_file() and not (tmp_path / "checkpoint.pt").exists()
    config = tiny("reward.latency_target=5")
    net = tiny_net()
    with pytest.raises(ValueError, match="pass budget="):
        build_searcher(net.decisions(), config, net.flops, net=net, search_steps=3)


def test_a_search_with_a_latency_target_chooses_by_predicted_latency(fake_timer, tmp_path):
    probe = LatencyTable.measure(tiny_net(), 1, "cpu")
    low, high = probe.predict(tiny_net().min_arch()), probe.predict(tiny_net().max_arch())
    target = (low + high) / 2
    lines = []
    result = Search(tiny(f"reward.latency_target={target}"), tmp_path, log=lines.append).run()
    assert any("latency table measured" in line for line in lines)
    assert result["latency_target"] == target and result["flops_target"] is None
    assert result["latency"]["batch"] == 1 and result["latency"]["table"] == LATENCY
    table = json.loads((tmp_path / LATENCY).read_text())
    assert table["key"]["batch"] == 1
    candidates, chosen = result["candidates"], result["chosen"]
    assert all(c["latency_ms"] == pytest.approx(probe.predict(c["arch"])) and "flops" in c for c in candidates)
    under = [c["latency_ms"] for c in candidates if c["latency_ms"] <= target]
    if under:
        assert chosen["latency_ms"] == under[0] and "the most likely arch of the beam within" in chosen["why"]
    else:
        assert chosen["latency_ms"] == min(c["latency_ms"] for c in candidates)
        assert "no arch of the beam is within the target" in chosen["why"]
    assert " ms" in chosen["why"]
    assert any("ms predicted" in line for line in lines)


def test_latency_benchmark_quick(tmp_path):
    assert bench_latency.main(["--quick", "--out", str(tmp_path / "cpu"), "--table", str(tmp_path / "demo.json")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    summary = [r for r in rows if r["table"] == "summary"]
    assert len(summary) == 1 and summary[0]["archs"] == 5 and len(rows) == 6
    assert {"pearson", "mare", "choice"} <= set(summary[0])
    assert summary[0]["choice"]["measured_ms"] > 0 and summary[0]["choice"]["uniform_measured_ms"] > 0
    assert all(r["command"].startswith("apsfast bench latency") for r in rows)
    assert "Pearson r" in (tmp_path / "cpu.md").read_text()
    stable = summary[0]["stability"]
    assert 0 <= stable["median"] <= stable["max"] and 0 <= stable["within_5pct"] <= 1
    net = models.build(*bench_latency.SPACES["demo"][:1], device="meta", **bench_latency.SPACES["demo"][1])
    table, _ = latency.read_table(tmp_path / "demo.json", net, 32, "torch")  # what reward.latency_table reads
    assert len(table.entries) == summary[0]["ops"]


@pytest.mark.parametrize("op", [
    latency.Op("conv", 6, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2, (7, 9), False, True),
    latency.Op("conv", 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, (5, 5), True, False),
    latency.Op("bn", 5, 5, in_hw=(3, 4)),
    latency.Op("linear", 6, 3, bias=True),
], ids=["conv-bn-grouped-stride2", "depthwise-bias", "bn", "linear"])
def test_an_op_written_to_onnx_computes_what_its_module_does(op):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from apsfast.models.runtime import runner
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module, x = op.module("cpu"), op.input(2, "cpu")
        for bn in (m for m in module if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    with torch.no_grad():
        want = module(x.clone())
    got = runner(module, x, "onnxruntime", threads=1, op=True)()[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_timings_are_medians_of_interleaved_rounds_with_the_threads_restored():
    threads = torch.get_num_threads()
    timings = latency.time_calls({"a": lambda: sum(range(1000)), "b": lambda: None}, "cpu", repeats=5, warmup=1,
                                 threads=1)
    assert set(timings) == {"a", "b"} and timings["a"].ms > timings["b"].ms > 0
    assert all(t.spread >= 0 for t in timings.values()) and torch.get_num_threads() == threads


def test_a_table_measured_elsewhere_is_read_for_the_same_space_batch_and_runtime(fake_timer, tmp_path):
    net, path = tiny_net(), tmp_path / "measured-there.json"
    table = LatencyTable.measure(net, 1, "cpu")
    saved = table.to_json()
    saved["key"].update(device="another CPU", threads=4)  # measured on the machine the network will run on
    path.write_text(json.dumps(saved))
    read, note = latency.read_table(path, net, 1, "torch")
    arch = net.sample_uniform(torch.Generator().manual_seed(1))
    assert read.predict(arch) == pytest.approx(table.predict(arch)) and "another CPU, 4 thread(s)" in note
    with pytest.raises(ValueError, match=r"measured for another batch: batch: 1 \(the run's: 8\)"):
        latency.read_table(path, net, 8, "torch")
    with pytest.raises(ValueError, match="measured for another options, decisions"):
        latency.read_table(path, tiny_net("block"), 1, "torch")
    with pytest.raises(ValueError, match="is not a latency table"):
        latency.read_table(tmp_path / "missing.json", net, 1, "torch")
    # A search given the file reads it (nothing measured) and keeps a copy with the run.
    measured = fake_timer["ops"]
    lines: list[str] = []
    Search(tiny("reward.latency_target=5", f"reward.latency_table={path}"), tmp_path / "run", log=lines.append)
    assert fake_timer["ops"] == measured and any("latency table read from" in line for line in lines)
    assert json.loads((tmp_path / "run" / LATENCY).read_text())["key"]["device"] == "another CPU"
    with pytest.raises(ConfigError, match="reward.latency_table: .*measured for another batch"):
        Search(tiny("reward.latency_target=5", "reward.latency_batch=2", f"reward.latency_table={path}"),
               tmp_path / "other", log=quiet)
