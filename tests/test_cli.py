"""The command line, the build metadata and the backend registry."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import apsfast
from apsfast import _backends, _build, cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apsfast", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_expected_backends_are_built():
    # make test sets this: a backend the build should have produced must not silently vanish.
    expected = [name for name in os.environ.get("APSFAST_EXPECT_BACKENDS", "").split(",") if name]
    available = apsfast.backends()
    assert "reference" in available
    for name in expected:
        assert name in available, f"backend {name} missing: {_backends.status()[name]}"


def test_info_lists_every_backend(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == set(_backends.NAMES)
    assert info["backends"]["reference"] == "available"
    assert info["apsfast"] == apsfast.__version__
    assert cli.main(["info"]) == 0 and "backends:" in capsys.readouterr().out


def test_info_check_finds_bad_input_raising():
    # The compiled ops built here raise on bad input (a toolchain whose C++ runtime differs from
    # the process's can make them crash instead).
    if "cpu" not in apsfast.backends():
        pytest.skip("no compiled backend built")
    result = run_cli("info", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: raised 'P.shape[0] must be weight.shape[0] = 8, got 6'" in result.stdout


def test_check_errors_reports_a_crash(monkeypatch):
    if "cpu" not in apsfast.backends():
        pytest.skip("no compiled backend built")
    monkeypatch.setattr(_build, "_BAD_CALL", "import ctypes; ctypes.string_at(0)  # {backend} {device}")
    result = _build.check_errors()["cpu"]
    assert result.startswith("CRASHED (exit -11") and "CC/CXX" in result


def test_demo_runs(tmp_path, capsys):
    # The demo's own code path on a tiny configuration, in a temporary folder.
    from apsfast import demo
    from test_search import TINY
    out = demo.main(tmp_path / "demo", overrides=TINY)
    printed = capsys.readouterr().out
    assert "Theorem 3.1" in printed and "demo done" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "resnet20_cifar" and result["strategy"] == "transitional"
    assert len(result["candidates"]) == 4 and result["chosen"]["arch"] == result["candidates"][0]["arch"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert [r["phase"] for r in epochs] == ["warmup", "search", "search"]
    assert all(r["val_images"] == 64 and 0 <= r["val_acc"] <= 1 for r in epochs)
    for name in ("curves.png", "decisions.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 10_000
    summary = json.loads((out / "retrain" / "retrain.json").read_text())
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1


def test_extension_built_against_other_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: {"torch": "0.0.1", "extensions": ["_C"]})
    with pytest.raises(ImportError, match=r"built against torch 0.0.1 .*rebuild with pip install"):
        _build.load_extension("_C")
    monkeypatch.setattr(_build, "build_info", lambda: {})
    with pytest.raises(ImportError, match=r"apsfast._C was not built"):
        _build.load_extension("_C")


def test_without_extension_everything_falls_back_to_reference(monkeypatch, scoped):
    # As on a machine where nothing was compiled: the registry finds no build info.
    monkeypatch.setattr(_build, "build_info", lambda: {})
    monkeypatch.setattr(_backends, "_loaded", {})
    monkeypatch.setattr(_backends, "_reasons", {})
    monkeypatch.delitem(sys.modules, "apsfast._backends.cpu", raising=False)
    scoped.delenv(_backends.ENV_VAR)
    assert "cpu" not in apsfast.backends() and "reference" in apsfast.backends()
    assert "was not built" in _backends.status()["cpu"]
    layer = apsfast.nn.APSConv2d((2, 4), (3, 5), 3, padding=1)
    layer(torch.randn(1, 4, 5, 5)).sum().backward()
    assert layer.weight.grad is not None


def test_models_table_and_decisions(capsys):
    # In process: the table builds ten supernets on the meta device.
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{name}`" in out for name in ("resnet20_cifar", "resnet56_cifar", "resnet18_imagenet",
                                                "mobilenetv2_imagenet"))
    assert cli.main(["models", "resnet20_cifar", "-o", "residual=stage", "-o", "widths=[8,16]"]) == 0
    assert "| 12 | `layer3.2.conv1` | {8,16} | 64 → 16 |" in capsys.readouterr().out  # 13 decisions
    assert cli.main(["models", "mobilenetv2_imagenet", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["decisions"] == 24 and record["params"]["standard"] == 3_504_872


@pytest.mark.parametrize("args, message", [
    (["resnet20_cifar", "-o", "depth=3"], "unknown option(s) ['depth']"),
    (["-o", "residual=stage"], "needs a model NAME"),
    (["resnet20_cifar", "-o", "residual"], "expected KEY=VALUE"),
    (["resnet21"], "unknown model 'resnet21'"),
    # A model of your own (tests/user_models.py): the input size is a convert setting, said so.
    (["user_models:tiny_cnn"], """e.g. apsfast models user_models:tiny_cnn -o 'convert={"input_size": 32}'"""),
    (["user_models:tiny_cnn", "-o", "input_size=16"], """e.g. -o 'convert={"input_size": ...}'"""),
    (["user_models:tiny_cnn", "-o", "width=16"], """e.g. -o 'options={"width": ...}'"""),
])
def test_models_bad_options_are_clear(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", *args])
    assert exit_info.value.code != 0
    assert message in str(exit_info.value.code) + capsys.readouterr().err
