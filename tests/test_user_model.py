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
from test_search import TINY, quiet
from user_models import tiny_cnn

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
    summary = retrain(tmp_path, model=net, log=quiet)
    assert 0 <= summary["test_acc"] <= 1 and summary["widths"] == result["chosen"]["widths"]
    with pytest.raises(ConfigError, match="pass the supernet the search was given"):
        retrain(tmp_path, tmp_path / "other", model=other, log=quiet)
    capsys.readouterr()


@pytest.mark.parametrize("net, message", [
    (lambda: apsfast.convert(tiny_cnn(num_classes=5), torch.zeros(1, 3, 8, 8)), r"returns shape \[1, 5\].*10 classes"),
    (lambda: apsfast.convert(tiny_cnn(), torch.zeros(1, 3, 16, 16)), "input size 16, but the data's images are 8×8"),
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
