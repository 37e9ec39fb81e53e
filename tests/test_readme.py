"""The README's examples run as written and its tables say what the code says."""
import json
import re
import shlex
from pathlib import Path

import pytest

from apsfast import cli
from apsfast.models import summary
from apsfast.search.metrics import read_metrics
from apsfast.search.schedule import Search

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 7, ("README should hold the layer, the search-space and the convert examples, the "
                              "factory module and Python search of a model of your own, and the data module and "
                              "Python search of data of your own")
    return blocks


def shell_commands(marker: str) -> list[list[str]]:
    """The ``apsfast`` commands of the ``sh`` block holding ``marker``, continuation lines
    joined, comments and the ``PYTHONPATH=.`` prefix dropped, split as a shell would."""
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S) if marker in b]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["PYTHONPATH=."]:
            words = words[1:]
        if words:
            assert words[0] == "apsfast", line
            commands.append(words[1:])
    return commands


def run(block: str) -> dict:
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_layer_example_runs():
    namespace = run(python_blocks()[0])
    assert namespace["y"].shape == (8, 64, 16, 16)
    assert namespace["static"].out_channels == 64


def test_readme_search_space_example_runs():
    namespace = run(python_blocks()[1])
    assert namespace["logits"].shape == (2, 10)
    assert namespace["net"].arch == namespace["arch"]


def test_readme_convert_example_runs():
    namespace = run(python_blocks()[2])
    net, arch = namespace["net"], namespace["arch"]
    assert net.widths(arch) == {"stem.0": 16, "body.0": 32}
    assert sum(p.numel() for p in namespace["static"].parameters()) == net.params(arch)


def test_readme_search_space_table_is_current():
    rows = [summary.summary(name, **options) for name, options in cli.PAPER_SPACES]
    assert summary.markdown(rows) in README.read_text()


def test_readme_own_model_search_runs(tmp_path, monkeypatch, capsys):
    # The factory module as the README shows it, then its commands and its Python search, as
    # written, in a folder of their own (the commands' PYTHONPATH=. is the sys.path entry).
    blocks = python_blocks()
    (tmp_path / "mynets.py").write_text(blocks[3])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = shell_commands("--model mynets:small_cnn")
    assert [c[0] for c in commands] == ["search", "search", "train", "export"]
    for command in commands:
        assert cli.main(command) == 0
    result = json.loads((tmp_path / "runs" / "mynets" / "result.json").read_text())
    assert result["model"] == "mynets:small_cnn" and [d["name"] for d in result["decisions"]] == ["stem.0", "block.0"]
    assert "the search in runs/mynets is complete" in capsys.readouterr().out
    assert (tmp_path / "runs" / "mynets" / "retrain" / "retrain.json").is_file()
    assert (tmp_path / "runs" / "mynets.pt2").stat().st_size > 0
    namespace = run(blocks[4])
    assert namespace["result"]["model"] == "converted:SmallCNN"
    assert 0 <= namespace["summary"]["test_acc"] <= 1


def test_readme_own_data_search_resumes_after_a_kill_retrains_and_exports(tmp_path, monkeypatch, capsys):
    # The data module and the Python search as written: killed in its second epoch (after the
    # first epoch's checkpoint), run again (it resumes), retrained and exported to ONNX.
    pytest.importorskip("sklearn")
    pytest.importorskip("onnxscript")
    blocks = python_blocks()
    (tmp_path / "mynets.py").write_text(blocks[3])
    (tmp_path / "mydata.py").write_text(blocks[5])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps, train_step = [], Search.train_step

    def killed(self, *args, **kwargs):
        steps.append(self.step)
        if len(steps) == 6:
            raise KeyboardInterrupt
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(Search, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(blocks[6])
    run_dir = tmp_path / "runs" / "digits"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists()
    namespace = run(blocks[6])
    assert "resuming the run in runs/digits" in capsys.readouterr().out
    assert steps[6] == 4  # the second epoch again from its start (train.steps_per_epoch=4)
    epochs = read_metrics(run_dir / "metrics.jsonl", kind="epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    result = namespace["result"]
    assert result["data"] == "python:Digits" and result["config"]["data"]["options"]["input_shape"] == [1, 8, 8]
    assert 0 <= namespace["summary"]["test_acc"] <= 1
    assert (run_dir / "digits.onnx").stat().st_size > 0
