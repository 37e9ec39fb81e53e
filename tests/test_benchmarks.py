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


def test_search_space_layer_tables():
    assert len(kernels.resnet20_layers(8)) == 19
    mbv2 = kernels.mobilenetv2_layers(8)
    assert sum(s.depthwise for s in mbv2) == 17 and mbv2[-1].out_widths[-1] == 1280
