"""Deployment: model.pt loads with torch alone (the recipe of docs/deploy.md, in a process where apsfast
cannot be imported), ONNX export checked with onnxruntime, torch.export files, and the errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apsfast import cli, models
from apsfast.search import deploy, export_onnx, export_pt2, load_exported, portable
from apsfast.search.checkpoint import load_checkpoint, save_checkpoint
from apsfast.search.result import save_exported

DEPLOY_PAGE = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
# A space of each block kind (ResNet-18's blocks are ResNet-20's), and a user model
# (tests/user_models.py) rebuilt by its factory.
SPACES = {"resnet20_cifar": dict(widths=[4, 8], num_classes=10, input_size=16),
          "mobilenetv2_imagenet": dict(widths=[2, 4], num_classes=10, input_size=32),
          "user_models:tiny_cnn": dict(convert={"input_size": 16, "round_to": 4})}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def mixed_arch(net: models.Supernet) -> list[int]:
    """Widest and narrowest alternating: shortcut projections where widths change."""
    return [(len(d.widths) - 1) * (i % 2) for i, d in enumerate(net.decisions())]


def exported_run(folder: Path, name: str) -> Path:
    """A search's folder holding ``model.pt`` of ``name``'s space at a mixed arch, its
    batch-norm statistics moved away from their initial values (so that eval mode shows)."""
    torch.manual_seed(0)
    net = models.build(name, **SPACES[name])
    arch = mixed_arch(net)
    static = net.export(arch)
    for module in static.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    save_exported(folder / "model.pt", net, arch, static)
    (folder / "result.json").write_text(json.dumps({"model": net.name}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: exported_run(root / name.replace(":", "."), name) for name in SPACES}


def page_recipe() -> str:
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", DEPLOY_PAGE.read_text(), re.S) if "torch.export.load" in b]
    return block


def test_model_pt_loads_with_torch_alone_as_the_deploy_page_says(runs, tmp_path):
    x = {name: torch.randn(3, *load_checkpoint(run / "model.pt")["input_shape"]) for name, run in runs.items()}
    torch.save(x, tmp_path / "inputs.pt")
    recipe = page_recipe()
    assert '"runs/my-search/model.pt"' in recipe
    # The recipe as written, once per model.pt, in a process where `import apsfast` fails.
    child = textwrap.dedent("""
        import json, sys
        sys.modules["apsfast"] = None
        import torch
        recipe, runs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
        inputs, outputs = torch.load(out + "/inputs.pt"), {}
        for name, run in runs.items():
            namespace = {}
            exec(recipe.replace("runs/my-search", run), namespace)
            assert namespace["logits"].shape[0] == 8
            outputs[name] = namespace["model"](inputs[name])
        torch.save(outputs, out + "/outputs.pt")
    """)
    folders = json.dumps({name: str(run) for name, run in runs.items()})
    done = subprocess.run([sys.executable, "-c", child, recipe, folders, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    for name, run in runs.items():
        model = load_exported(run / "model.pt").eval()
        with torch.no_grad():
            torch.testing.assert_close(outputs[name], model(x[name]), rtol=1e-5, atol=1e-5)


def test_model_pt_stays_a_weights_only_checkpoint(runs):
    state = torch.load(runs["resnet20_cifar"] / "model.pt", weights_only=True)
    assert state["kind"] == "exported" and state["input_shape"] == [3, 16, 16]
    assert isinstance(state["program"], bytes) and state["program_torch"] == str(torch.__version__)
    # The program leaves the weights to state_dict: they are stored once.
    weights = sum(t.numel() * t.element_size() for t in state["state_dict"].values())
    assert weights > 10_000 and all(t.device.type == "cpu" for t in state["state_dict"].values())


def test_a_model_pt_without_program_still_loads(runs, tmp_path):
    # As written before model.pt carried a program and its input shape.
    state = load_checkpoint(runs["resnet20_cifar"] / "model.pt")
    for key in ("program", "program_torch", "input_shape", "format", "apsfast"):
        state.pop(key)
    (tmp_path / "old").mkdir()
    save_checkpoint(tmp_path / "old" / "model.pt", state)
    model = deploy.load_model(tmp_path / "old" / "model.pt")
    assert model.input_shape == [3, 16, 16] and not model.module.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), load_exported(runs["resnet20_cifar"] / "model.pt").eval()(x))


def test_result_portable_false_saves_no_program(tmp_path):
    net = models.build("resnet20_cifar", **SPACES["resnet20_cifar"])
    arch = mixed_arch(net)
    save_exported(tmp_path / "model.pt", net, arch, net.export(arch), portable=False)
    state = load_checkpoint(tmp_path / "model.pt")
    assert "program" not in state and "input_shape" not in state
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "model.pt").eval()(x), net.export(arch).eval()(x))


def test_a_network_torch_export_refuses_is_saved_without_program(monkeypatch, tmp_path):
    def refuse(*args):
        raise RuntimeError("data-dependent control flow\nmore")

    monkeypatch.setattr(portable, "trace_program", refuse)
    net = models.build("resnet20_cifar", **SPACES["resnet20_cifar"])
    with pytest.warns(RuntimeWarning, match="without a torch.export program .RuntimeError: data-dependent control "
                                            "flow.: it loads with apsfast"):
        save_exported(tmp_path / "model.pt", net, net.min_arch(), net.export(net.min_arch()))
    state = load_checkpoint(tmp_path / "model.pt")
    assert "program" not in state and state["input_shape"] == [3, 16, 16]
    assert load_exported(tmp_path / "model.pt")(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_export_writes_onnx_that_onnxruntime_runs_like_pytorch(runs, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    run = runs["resnet20_cifar"]
    assert cli.main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--pt2", str(tmp_path / "m.pt2")]) == 0
    said = capsys.readouterr().out
    assert f"exporting the searched model (no finished retrain in retrain/) {run / 'model.pt'}" in said
    assert re.search(r"onnxruntime.s outputs are within (\d\.\de-(0[5-9]|1\d)|0\.0e\+00) of PyTorch.s", said), said
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 16, 16]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model = load_exported(run / "model.pt").eval()
    program = torch.export.load(tmp_path / "m.pt2").module()  # the .pt2 carries its weights
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(program(x), want)
        (got,) = session.run(["logits"], {"input": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_pt2_of_a_module(runs, tmp_path):
    # The module the deploy page's recipe rebuilds (the way out for a supernet converted in Python,
    # which apsfast cannot rebuild), which refuses .eval().
    namespace: dict = {}
    exec(page_recipe().replace("runs/my-search", str(runs["user_models:tiny_cnn"])), namespace)
    model = namespace["model"]
    assert export_pt2(model, tmp_path / "m.pt2", input_shape=[3, 16, 16]) == tmp_path / "m.pt2"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left


def test_the_retrained_model_is_preferred(tmp_path):
    search = tmp_path / "search"
    (search / "retrain").mkdir(parents=True)
    for path in (search / "result.json", search / "model.pt"):
        path.write_text("")
    assert deploy.find_model(search)[0] == search / "model.pt"  # no finished retrain
    (search / "retrain" / "retrained.pt").write_text("")
    assert deploy.find_model(search) == (search / "retrain" / "retrained.pt",
                                         f"the retrained model {search / 'retrain' / 'retrained.pt'}")
    assert deploy.find_model(search, searched=True)[0] == search / "model.pt"
    assert deploy.find_model(search / "retrain")[0] == search / "retrain" / "retrained.pt"
    assert deploy.find_model(search / "model.pt")[0] == search / "model.pt"
    with pytest.raises(ValueError, match=r"searched \(--searched\) goes with a search's folder"):
        deploy.find_model(search / "retrain", searched=True)


def test_export_errors_name_what_is_wrong(runs, tmp_path, monkeypatch):
    run = runs["resnet20_cifar"]
    with pytest.raises(FileNotFoundError, match="no run or model at .*nowhere"):
        deploy.find_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a run: it holds no result.json, model.pt or retrained.pt"):
        deploy.find_model(tmp_path / "empty")
    (tmp_path / "unfinished" / "result.json").parent.mkdir()
    (tmp_path / "unfinished" / "result.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no model.pt: the search has not finished"):
        deploy.find_model(tmp_path / "unfinished")
    with pytest.raises(FileNotFoundError, match="no folder .*missing"):
        export_pt2(run, tmp_path / "missing" / "m.pt2")
    with pytest.raises(IsADirectoryError, match="is a folder: pass the file to write"):
        export_pt2(run, tmp_path)
    with pytest.raises(ValueError, match="input_shape .C, H, W. is required with a module"):
        export_pt2(torch.nn.Identity(), tmp_path / "m.pt2")
    # A converted supernet of Python: apsfast cannot rebuild it, torch alone can.
    state = load_checkpoint(run / "model.pt")
    save_checkpoint(tmp_path / "converted.pt", {**state, "model": "converted:TinyCNN"})
    with pytest.raises(ValueError, match=r"apsfast.convert in Python.*input_shape=\[3, 16, 16\]"):
        deploy.load_model(tmp_path / "converted.pt")
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("pip install onnx onnxscript onnxruntime (apsfast's onnx extra: pip install --no-build-isolation")):
        export_onnx(run, tmp_path / "m.onnx")


def test_export_command_line_errors_are_one_line(runs, tmp_path):
    with pytest.raises(SystemExit, match="apsfast export: pass --onnx PATH and/or --pt2 PATH"):
        cli.main(["export", str(runs["resnet20_cifar"])])
    with pytest.raises(SystemExit, match="apsfast export: no run or model at"):
        cli.main(["export", str(tmp_path / "nowhere"), "--pt2", str(tmp_path / "m.pt2")])
    with pytest.raises(SystemExit, match="apsfast export: opset must be an int >= 18"):
        cli.main(["export", str(runs["resnet20_cifar"]), "--onnx", str(tmp_path / "m.onnx"), "--opset", "11"])
    assert not (tmp_path / "m.onnx").exists()
