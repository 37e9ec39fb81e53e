"""A model of your own in a search: ``apsfast search --model package.module:factory`` (its
supernet rebuilt from the run's folder for ``--resume`` and ``apsfast train``), the Python
``search(config, out, model=supernet)``, and the one-line errors of a factory that does not fit.

The factories live in ``tests/user_models.py``, importable as ``user_models`` because pytest
puts this folder on ``sys.path``.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import apsfast
from apsfast import cli
from apsfast.search import ConfigError, Search, load_config, load_exported, retrain, search
from apsfast.search.baselines import retrain_top, retrain_uniform, uniform_arch
from test_search import TINY, quiet
from user_models import Stripes, tiny_cnn

FACTORY = "user_models:tiny_cnn"
# test_search's tiny run without its model options (those of the demo's ResNet-20).
TINY_RUN = [item for item in TINY if not item.startswith("model.")]
SETS = [arg for item in TINY_RUN for arg in ("-s", item)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def test_command_line_searches_resumes_and_retrains_a_factory(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["search", "--preset", "demo", "--model", FACTORY, *SETS, "-s", "model.convert.round_to=4",
                     "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == FACTORY
    assert result["options"] == {"options": {}, "sharing": "transitional",
                                 "convert": {"widths": [0.5, 0.75, 1.0], "round_to": 4, "exclude": [], "input_size": 8}}
    assert [(d["name"], d["widths"]) for d in result["decisions"]] == [("stem.0", [4, 8]), ("body.0", [8, 12, 16])]
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved == {"name": FACTORY, "options": {}, "convert": {"round_to": 4}}
    static = load_exported(out / "model.pt")  # rebuilt by name: the factory, converted
    assert static(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    assert sum(p.numel() for p in static.parameters()) == result["chosen"]["params"]
    # The folder alone rebuilds the supernet: a resume loads the checkpoint into it.
    assert cli.main(["search", "--resume", "--out", str(out)]) == 0
    assert f"the search in {out} is complete" in capsys.readouterr().out
    assert cli.main(["train", str(out), "-s", "retrain.epochs=1"]) == 0
    summary = json.loads((out / "retrain" / "retrain.json").read_text())
    assert summary["model"] == FACTORY and summary["widths"] == result["chosen"]["widths"]
    assert load_exported(out / "retrain" / "retrained.pt")(torch.zeros(1, 3, 8, 8)).shape == (1, 10)


def test_python_search_of_a_converted_supernet(tmp_path, capsys):
    config = load_config("demo", overrides=TINY_RUN)
    net = apsfast.convert(tiny_cnn(), torch.zeros(1, 3, 8, 8), round_to=4)
    result = Search(config, tmp_path, model=net, log=quiet).run()
    assert result["model"] == "converted:TinyCNN" and len(result["decisions"]) == 2
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"] == {
        "name": "converted:TinyCNN", "options": {},
        "convert": {"widths": [0.5, 0.75, 1.0], "round_to": 4, "exclude": [], "input_size": 8}}
    assert search(config, tmp_path, resume=True, model=net) == result  # the same supernet again
    other = apsfast.convert(tiny_cnn(width=16), torch.zeros(1, 3, 8, 8), round_to=4)
    with pytest.raises(ConfigError, match="resume with the supernet the run was started with"):
        Search(config, tmp_path, resume=True, model=other, log=quiet)
    # The folder cannot rebuild it: the command line says how to go on.
    with pytest.raises(SystemExit, match=r"pass the same supernet again \(search\(config, out, resume=True, model=net"):
        cli.main(["search", "--resume", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"apsfast train: .*converted:TinyCNN.*retrain\(.*model=net\)"):
        cli.main(["train", str(tmp_path)])
    with pytest.raises(ValueError, match=r"pass it again \(load_exported\(path, model=net\)\), or load the file "
                                         r"with torch alone: state = torch.load"):
        load_exported(tmp_path / "model.pt")
    assert load_exported(tmp_path / "model.pt", model=net)(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    summary = retrain(tmp_path, model=net, log=quiet)
    assert 0 <= summary["test_acc"] <= 1 and summary["widths"] == result["chosen"]["widths"]
    with pytest.raises(ConfigError, match="pass the supernet the search was given"):
        retrain(tmp_path, tmp_path / "other", model=other, log=quiet)
    capsys.readouterr()


def test_command_line_searches_and_retrains_on_a_data_factory(tmp_path):
    # One-channel 6×10 inputs: the model is converted at the data's shape, read from the data.
    out, sets = tmp_path / "run", [arg for item in TINY_RUN if not item.startswith("data.") for arg in ("-s", item)]
    assert cli.main(["search", "--preset", "demo", "--model", FACTORY, *sets, "-s", "data.name=user_models:stripes",
                     "-s", "model.options={num_classes: 3, in_channels: 1}", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["data"] == "user_models:stripes" and result["input_size"] == [6, 10]
    assert result["options"]["convert"]["input_size"] == [6, 10] and result["options"]["convert"]["in_channels"] == 1
    assert cli.main(["search", "--resume", "--out", str(out)]) == 0  # the folder names the factory: it reloads
    assert cli.main(["train", str(out), "-s", "retrain.epochs=1"]) == 0
    assert load_exported(out / "retrain" / "retrained.pt")(torch.zeros(2, 1, 6, 10)).shape == (2, 3)


@pytest.mark.parametrize("given, message", [
    (lambda: {"train_data": torch.utils.data.DataLoader(Stripes(8))}, "train_data is a DataLoader: pass its dataset"),
    (lambda: {"val_data": Stripes(8)}, "val_data was given without train_data"),
    (lambda: {"train_data": [torch.zeros(3, 8, 8)]}, r"dataset\[0\] must be an \(input, label\) pair"),
    (lambda: {"train_data": [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)]}, "must give a float tensor"),
    (lambda: {"train_data": Stripes(64), "val_data": [(torch.zeros(1, 6, 8), 0)]},
     r"val_data has input_shape \(1, 6, 8\), train_data \(1, 6, 10\)"),
    (lambda: {"train_data": Stripes(64)}, r"inputs \[C, H, W\] = \[3, 8, 8\], but the data's are \[1, 6, 10\]"),
], ids=["loader", "val-alone", "not-a-pair", "uint8", "shapes", "model"])
def test_data_that_does_not_fit_the_run_is_refused(tmp_path, given, message):
    net = apsfast.convert(tiny_cnn(num_classes=3), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match=message):
        Search(load_config("demo", overrides=TINY_RUN), tmp_path / "run", model=net, log=quiet, **given())
    assert not (tmp_path / "run").exists()


def test_a_run_given_its_data_in_python_says_how_to_go_on_from_the_command_line(tmp_path):
    config = load_config("demo", overrides=[*TINY_RUN, "train.epochs=2", "train.steps_per_epoch=1"])
    config.model.name, config.model.options = FACTORY, {"num_classes": 3, "in_channels": 1}
    Search(config, tmp_path, train_data=Stripes(96), log=quiet).run()
    with pytest.raises(SystemExit, match=r"given its data sets in Python.*retrain\(RUN, train_data=\.\.\., val_data"):
        cli.main(["train", str(tmp_path), "--out", str(tmp_path / "other")])
    with pytest.raises(ConfigError, match="a retrain needs the held-out set to score on: pass val_data"):
        retrain(tmp_path, train_data=Stripes(96), log=quiet)


@pytest.mark.parametrize("net, message", [
    (lambda: apsfast.convert(tiny_cnn(num_classes=5), torch.zeros(1, 3, 8, 8)), r"returns shape \[1, 5\].*10 classes"),
    (lambda: apsfast.convert(tiny_cnn(), torch.zeros(1, 3, 16, 16)), r"inputs \[C, H, W\] = \[3, 16, 16\], but the data's are \[3, 8, 8\]"),
    (lambda: apsfast.convert(tiny_cnn(), torch.zeros(1, 3, 8, 8), sharing="ordinal"), "needs sharing='transitional'"),
], ids=["classes", "input-size", "sharing"])
def test_a_supernet_that_does_not_fit_the_run_is_refused(tmp_path, net, message):
    with pytest.raises(ConfigError, match=message):
        Search(load_config("demo", overrides=TINY_RUN), tmp_path / "run", model=net(), log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    # What goes wrong with the factory names model.name.
    (["--model", "no_such_module_apsfast:build"],
     r"model.name = 'no_such_module_apsfast:build': cannot import module 'no_such_module_apsfast'.*PYTHONPATH"),
    (["--model", "user_models:missing"], "model.name = 'user_models:missing': module 'user_models' has no 'missing'"),
    (["--model", "user_models:NOT_CALLABLE"], r"model.name = .*: 'user_models:NOT_CALLABLE' is not callable"),
    (["--model", "user_models:not_a_module"], "model.name = .*: the model factory .* returned a str; expected a "
                                              "torch.nn.Module"),
    (["--model", FACTORY, "-s", "model.options.depth=3"], "model.name = .*unexpected keyword argument 'depth'"),
    (["--model", FACTORY, "-s", "model.options.num_classes=5"],
     r"model.name = 'user_models:tiny_cnn' returns shape \[1, 5\] for one image.*10 classes"),
    (["--model", "user_models:Branches"], "model.name = .*convert: torch.fx cannot trace Branches"),
    (["--model", FACTORY, "-s", "model.convert.input_size=32"], "model.convert.input_size = 32 but the data"),
    (["--model", FACTORY, "-s", "model.convert.stride=2"], r"model.convert has unknown setting\(s\) \['stride'\]"),
    (["--model", "a model:x"], "expected package.module:factory"),
    (["--model", "os:system"], "module 'os' is part of Python's standard library"),
    (["-s", "model.convert.round_to=4"], "model.convert applies to a model of your own"),
], ids=["import", "attribute", "not-callable", "not-a-module", "options", "classes", "refused", "input-size",
        "convert-key", "name", "stdlib", "builtin"])
def test_a_factory_that_does_not_fit_stops_before_any_file(tmp_path, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message) as stopped:
        cli.main(["search", "--preset", "demo", *args, *SETS, "--out", str(out)])
    text = str(stopped.value)
    assert text.startswith("apsfast search: ") and "\n" not in text
    assert not out.exists()


def test_a_search_on_a_dataset_of_your_own_resumes_to_the_same_result(tmp_path):
    # Its random transform draws from the global generator: the resumed run must draw the same.
    config = load_config("demo", overrides=[*TINY_RUN, "train.steps_per_epoch=2"])
    net = lambda: apsfast.convert(tiny_cnn(num_classes=3, in_channels=1), torch.zeros(1, 1, 6, 10))  # noqa: E731
    torch.manual_seed(0)
    expected = Search(config, tmp_path / "whole", model=net(), train_data=Stripes(160), log=quiet).run()
    torch.manual_seed(0)
    interrupted = Search(config, tmp_path / "cut", model=net(), train_data=Stripes(160), log=quiet)
    original, calls = interrupted.train_step, []

    def stop_at_step_4(*args):
        calls.append(1)
        if len(calls) == 4:  # mid-way through the second epoch
            raise KeyboardInterrupt
        return original(*args)

    interrupted.train_step = stop_at_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    torch.manual_seed(0)
    supernet = net()
    resumed = Search(config, tmp_path / "cut", resume=True, model=supernet, train_data=Stripes(160), log=quiet)
    assert resumed.step == 2  # the first epoch's end: the checkpoint before the kill
    assert resumed.run() == expected
    with pytest.raises(ConfigError, match="a resume may not change data.options"):
        Search(config, tmp_path / "cut", resume=True, model=supernet, train_data=Stripes(96), log=quiet)
    # The beam's top archs and the uniform baseline retrain on the same data and supernet.
    data = {"train_data": Stripes(160), "val_data": Stripes(48, seed=1)}
    top = retrain_top(tmp_path / "whole", 2, log=quiet, model=supernet, **data)
    assert [row["arch"] for row in top["archs"]] == [c["arch"] for c in expected["candidates"][:2]]
    assert all(0 <= row["test_acc"] <= 1 for row in top["archs"])
    uniform = retrain_uniform(config, 0.5, tmp_path / "uniform", log=quiet, model=supernet, **data)
    assert uniform["arch"] == uniform_arch(supernet, 0.5) and 0 <= uniform["test_acc"] <= 1
