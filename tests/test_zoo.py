"""convert on networks built by torchvision's and timm's own code, one per channel rule they
need (optional: skipped where the zoos are not installed). The full report over both zoos is
`apsfast bench zoo` (bench/results/cpu-zoo.md)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from apsfast import cli
from apsfast.benchmarks.zoo import check_one
from apsfast.models import zoo


def _needs(name: str) -> None:
    try:
        zoo.import_timm() if name == "timm" else zoo.import_torchvision()
    except ImportError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("spec", [
    "timm:mobilenetv3_small_050",       # BatchNormAct2d (F.batch_norm + act), timm's Linear, SE gates
    "torchvision:efficientnet_b0",      # stochastic_depth, SiLU, squeeze-excitation
    "torchvision:shufflenet_v2_x0_5",   # channel split and shuffle: pinned, the rest searched
    "timm:test_convnext",               # channels-last permute, LayerNorm and Linear MLP
    "timm:test_nfnet",                  # weight-standardised convs (ScaledStdConv2d), grouped ones pinned
])
def test_zoo_models_convert_exactly(spec, one_thread):
    _needs(spec.split(":")[0])
    row = check_one(spec, size=32)
    assert row["outcome"] == "exact", row
    assert row["decisions"] > 5


def test_a_zoo_factory_loads_by_name():
    # `apsfast search --model torchvision.models:resnet18`: the factory imports where
    # torchvision's compiled ops do not load (the CPU wheel) and builds the zoo's network.
    _needs("torchvision")
    from apsfast.models.registry import load_factory

    model = load_factory("torchvision.models:resnet18")(num_classes=3)
    assert model.fc.out_features == 3


def test_the_documented_zoo_search_runs(tmp_path, monkeypatch):
    # The own-model page's lines: a timm network searched a few steps, retrained, exported to ONNX.
    _needs("timm")
    text = (Path(__file__).resolve().parents[1] / "docs" / "own-model.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "--model timm:create_model" in b]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    assert [c[:2] for c in commands] == [["apsfast", "search"], ["apsfast", "train"], ["apsfast", "export"]]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert cli.main(command[1:]) == 0
    result = json.loads((tmp_path / "runs/zoo/result.json").read_text())
    assert result["options"]["options"]["model_name"] == "test_resnet" and len(result["decisions"]) > 5
    assert (tmp_path / "runs/zoo/retrain/retrained.pt").is_file() and (tmp_path / "runs/zoo/retrained.onnx").is_file()
