"""The README's examples run as written and its tables say what the code says."""
import re
from pathlib import Path

from apsfast import cli
from apsfast.models import summary

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 3, "README should hold the layer, the search-space and the convert examples"
    return blocks


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
