"""The package's files import one way: no file imports another that imports it back, directly
or around a loop (DESIGN.md §2). The graph is read from the source, every ``import`` and
``from … import`` counted wherever it stands (inside functions and ``TYPE_CHECKING`` blocks
too), so that a lazy import cannot hide a circle. And every module stays small:
under 400 lines, one job each."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apsfast"
MAX_LINES = 400


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The package's modules that the import statement ``node`` in module ``name`` loads: the
    named module, or for ``from m import x`` the submodule ``m.x`` where it is one, else ``m``
    (an outside name is dropped)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = []
    for target in targets:
        while target and target not in modules:  # `import apsfast.x.y` names a module; an attribute does not
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for node in ast.walk(ast.parse(path.read_text(), str(path)))
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in imported(name, path, node, modules)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative): each is a set of files that reach each other through their imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_package_imports_one_way():
    graph = import_graph()
    assert len(graph) > 50 and "apsfast.search.schedule" in graph["apsfast.search"]
    found = circles(graph)
    assert not found, "files that import each other:\n" + "\n".join(describe(c, graph) for c in found)


def test_the_check_finds_a_lazy_circle(tmp_path):
    # a two-file loop closed by an import inside a function, and a relative one around three files
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import d\n")
    (package / "d.py").write_text("from .e import g\n")
    (package / "e.py").write_text("import pkg.c as c\ng = 1\n")
    (package / "f.py").write_text("from pkg.a import f\nimport os\n")
    graph = import_graph(package)
    assert circles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]


def test_every_module_is_under_the_line_bound():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    over = {name: n for name, n in sizes.items() if n >= MAX_LINES}
    assert not over, f"modules of {MAX_LINES} lines or more, to split by job: {over}"
