"""The site's generated parts, as MkDocs hooks: the home page is the README (its links into
``docs/`` made relative to the site), the configuration reference is rendered from the typed
settings' own metadata (:mod:`apsfast.search.explain`), and the benchmarks' plots are served
from ``bench/results/`` as ``results/NAME.png``: none of them is a copy that can drift."""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
README_MARK = "<!-- apsfast:readme -->"
CONFIG_MARK = "<!-- apsfast:config-reference -->"


def on_page_markdown(markdown, page, config, files):
    if README_MARK in markdown:
        markdown = markdown.replace(README_MARK, README.read_text().replace("](docs/", "]("))
    if CONFIG_MARK in markdown:
        from apsfast.search.explain import markdown_reference
        markdown = markdown.replace(CONFIG_MARK, markdown_reference())
    return markdown


def on_files(files, config):
    for path in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
