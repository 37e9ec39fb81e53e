"""The examples of the README and of the site (docs/*.md) run as written, their commands are
ones the CLI takes, and their tables say what the code says. Every ``python`` block is run
by a test here: a new example without one fails ``test_every_python_example_runs_in_a_test``."""
import json
import re
import shlex
from pathlib import Path

import pytest

from apsfast import cli
from apsfast.models import summary
from apsfast.search import compare
from apsfast.search.metrics import read_metrics
from apsfast.search.schedule import Search

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The python blocks each test below runs, by page and position on it.
RUN = {("README.md", 0): "layer", ("search-spaces.md", 0): "search space", ("own-model.md", 0): "convert",
       ("own-model.md", 1): "factory module", ("own-model.md", 2): "Python search", ("own-model.md", 3): "data module",
       ("own-model.md", 4): "Python search of your own data"}


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def page(name: str) -> Path:
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


def example(key: tuple[str, int]) -> str:
    return blocks(page(key[0]), "python")[key[1]]


def shell_commands(block: str) -> list[list[str]]:
    """The ``apsfast`` commands of an ``sh`` block, continuation lines joined, comments and
    the ``PYTHONPATH=.`` prefix dropped, split as a shell would; other commands are left out."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["PYTHONPATH=."]:
            words = words[1:]
        if words[:1] == ["apsfast"]:
            commands.append(words[1:])
    return commands


def run(block: str, name: str) -> dict:
    namespace: dict = {}
    exec(compile(block, name, "exec"), namespace)
    return namespace


def test_readme_is_a_front_door():
    # At most ~200 lines; every page of the site is linked from it.
    text = page("README.md").read_text()
    assert len(text.splitlines()) <= 200
    pages = {p.name for p in PAGES} - {"README.md", "index.md"}
    assert {name for name in pages if f"(docs/{name}" not in text} == set()


def test_tables_start_after_a_blank_line():
    # The site's Markdown reads a table that follows a line of text as more of that text.
    for path in PAGES:
        lines, code = path.read_text().splitlines(), False
        for number, (before, line) in enumerate(zip([""] + lines, lines), 1):
            code ^= line.startswith("```")
            assert code or not line.startswith("|") or not before.strip() or before.startswith("|"), \
                f"{path.name}:{number}: a table needs a blank line before it"


def test_every_python_example_runs_in_a_test():
    found = {(p.name, i) for p in PAGES for i, _ in enumerate(blocks(p, "python"))}
    assert found == set(RUN), f"python examples without a test here: {sorted(found - set(RUN))}"


def test_every_command_is_one_the_cli_takes():
    # Lines with optional parts ([--out DIR]) or elisions (…) are synopses, not commands.
    commands = [c for p in PAGES for b in blocks(p, "sh") for c in shell_commands(b)
                if not any("[" in w or "…" in w for w in c)]
    assert len(commands) >= 10
    parser = cli.build_parser()
    for command in commands:
        try:  # compare reads every option after the command with a parser of its own
            if command[0] == "compare":
                compare.parse_args(command[1:], "apsfast compare")
            else:
                parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"the CLI refuses a documented command: apsfast {shlex.join(command)}")


def test_readme_layer_example_runs():
    namespace = run(example(("README.md", 0)), "README.md")
    assert namespace["y"].shape == (8, 64, 16, 16)
    assert namespace["static"].out_channels == 64


def test_search_space_example_runs():
    namespace = run(example(("search-spaces.md", 0)), "search-spaces.md")
    assert namespace["logits"].shape == (2, 10)
    assert namespace["net"].arch == namespace["arch"]


def test_convert_example_runs():
    namespace = run(example(("own-model.md", 0)), "own-model.md")
    net, arch = namespace["net"], namespace["arch"]
    assert net.widths(arch) == {"stem.0": 16, "body.0": 32}
    assert sum(p.numel() for p in namespace["static"].parameters()) == net.params(arch)


def test_search_space_table_is_current():
    rows = [summary.summary(name, **options) for name, options in cli.PAPER_SPACES]
    assert summary.markdown(rows) in page("search-spaces.md").read_text()


def test_own_model_search_runs(tmp_path, monkeypatch, capsys):
    # The factory module as the page shows it, then its commands and its Python search, as
    # written, in a folder of their own (the commands' PYTHONPATH=. is the sys.path entry).
    (tmp_path / "mynets.py").write_text(example(("own-model.md", 1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (block,) = [b for b in blocks(page("own-model.md"), "sh") if "--model mynets:small_cnn" in b]
    commands = shell_commands(block)
    assert [c[0] for c in commands] == ["search", "search", "train", "export"]
    for command in commands:
        assert cli.main(command) == 0
    result = json.loads((tmp_path / "runs" / "mynets" / "result.json").read_text())
    assert result["model"] == "mynets:small_cnn" and [d["name"] for d in result["decisions"]] == ["stem.0", "block.0"]
    assert "the search in runs/mynets is complete" in capsys.readouterr().out
    assert (tmp_path / "runs" / "mynets" / "retrain" / "retrain.json").is_file()
    assert (tmp_path / "runs" / "mynets.pt2").stat().st_size > 0
    namespace = run(example(("own-model.md", 2)), "own-model.md")
    assert namespace["result"]["model"] == "converted:SmallCNN"
    assert 0 <= namespace["summary"]["test_acc"] <= 1


def test_own_data_search_resumes_after_a_kill_retrains_and_exports(tmp_path, monkeypatch, capsys):
    # The data module and the Python search as written: killed in its second epoch (after the
    # first epoch's checkpoint), run again (it resumes), retrained and exported to ONNX.
    pytest.importorskip("sklearn")
    pytest.importorskip("onnxscript")
    (tmp_path / "mynets.py").write_text(example(("own-model.md", 1)))
    (tmp_path / "mydata.py").write_text(example(("own-model.md", 3)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps, train_step = [], Search.train_step

    def killed(self, *args, **kwargs):
        steps.append(self.step)
        if len(steps) == 6:
            raise KeyboardInterrupt
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(Search, "train_step", killed)
    search_block = example(("own-model.md", 4))
    with pytest.raises(KeyboardInterrupt):
        run(search_block, "own-model.md")
    run_dir = tmp_path / "runs" / "digits"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists()
    namespace = run(search_block, "own-model.md")
    assert "resuming the run in runs/digits" in capsys.readouterr().out
    assert steps[6] == 4  # the second epoch again from its start (train.steps_per_epoch=4)
    epochs = read_metrics(run_dir / "metrics.jsonl", kind="epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    result = namespace["result"]
    assert result["data"] == "python:Digits" and result["config"]["data"]["options"]["input_shape"] == [1, 8, 8]
    assert 0 <= namespace["summary"]["test_acc"] <= 1
    assert (run_dir / "digits.onnx").stat().st_size > 0
