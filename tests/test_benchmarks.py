"""The kernel benchmark CLI runs end to end (tiny shapes, one untimed round)."""
import json

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
