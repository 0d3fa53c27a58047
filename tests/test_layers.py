"""The package's layers: imports point down only, and no two modules import each other in a loop.

LAYERS is the one place the order is written; docs/architecture.md's "Layers" block must draw
the same order (checked below). Every module of medusa_bench is parsed (never imported), and
every import counts: at the top, inside a function, under a condition.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "medusa_bench"

# Top to bottom. A module's layer is its first name under medusa_bench (bench/loop.py: "bench",
# cli/app.py: "cli", the package's own __init__.py: "__init__"). A module may import from its own
# layer and any layer below it, never from one above.
LAYERS = [
    {"cli"},
    {"serve"},
    {"bench"},
    {"train", "judge"},
    {"decoders"},
    {"heads"},
    {"runtime"},
    {"models"},
    {"trees", "results", "inputs"},
    {"errors", "paths", "__init__"},
]


# ------------------------------------------------------------------------------ the checker
def module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """{module: {imported module of the same package: line}} for every .py file under `root`."""
    files = {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in imported(node, module, is_package):
                while target and target not in files:  # `from a.b import name`: the module a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement brings in: `from a import b` gives a.b (a submodule, or a name in a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def layer_of(module: str, package: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One loop per strongly connected group of modules (Tarjan), each as [a, b, …, a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursive: the package's import depth is small
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph.get(node, {}):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [loop_through(group, graph) for group in groups]


def loop_through(group: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """The shortest loop from the group's first module back to it (breadth first, inside the group)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return group


def upward_imports(graph: dict[str, dict[str, int]], layers: list[set[str]], package: str) -> list[str]:
    """'a imports b (line n): layer x is below layer y' for each import that points up; also modules in no layer."""
    rank = {name: depth for depth, layer in enumerate(layers) for name in layer}
    problems = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module, package)
        if mine not in rank:
            problems.append(f"{module} is in no layer: add {mine!r} to LAYERS (and docs/architecture.md)")
            continue
        for target, line in sorted(edges.items()):
            theirs = layer_of(target, package)
            if theirs in rank and rank[theirs] < rank[mine]:
                problems.append(f"{module} imports {target} (line {line}): {mine} is below {theirs}")
    return problems


def docs_layers(text: str) -> list[set[str]]:
    """The order architecture.md draws: the first code block under '## Layers', one layer per line,
    its names in the first column ('bench/ train/' or 'cli.py'), a description after 2+ spaces; an
    indented line goes on with the description above."""
    section = text.split("\n## Layers", 1)[1]
    block = section.split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        if line[:1].isspace():
            continue
        names = re.split(r"\s{2,}", line.strip())[0].split()
        if names:
            layers.append({name.removesuffix(".py").removesuffix("/") for name in names})
    return layers


# ------------------------------------------------------------------------------ the tests
def package_graph() -> dict[str, dict[str, int]]:
    return import_graph(REPO / PACKAGE, PACKAGE)


def test_no_import_cycles():
    found = [" → ".join(loop) for loop in cycles(package_graph())]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_point_down():
    problems = upward_imports(package_graph(), LAYERS, PACKAGE)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_every_layer_exists():
    """A layer named here but gone from the package is a stale order."""
    present = {layer_of(module, PACKAGE) for module in package_graph()}
    missing = sorted(name for layer in LAYERS for name in layer if name not in present)
    assert not missing, f"LAYERS names {missing}, which the package no longer has"


def test_architecture_draws_the_same_layers():
    drawn = docs_layers((REPO / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert drawn == LAYERS, f"docs/architecture.md's Layers block draws {drawn}; tests/test_layers.py enforces {LAYERS}"


def write_package(root: Path, modules: dict[str, str]) -> Path:
    for name, source in modules.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


def test_checker_finds_a_planted_cycle(tmp_path):
    """a → b → a, the second import inside a function: still a cycle."""
    root = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def later():\n    from pkg.a import thing\n",
        "c.py": "import pkg.a\n",  # into the loop, not part of it
    })
    assert cycles(import_graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_checker_finds_an_upward_import_and_relative_ones(tmp_path):
    root = write_package(tmp_path, {
        "__init__.py": "",
        "top/__init__.py": "",
        "top/x.py": "from ..low import y\n",
        "low/__init__.py": "",
        "low/y.py": "def f():\n    from ..top.x import z\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.top.x"] == {"pkg.low.y": 1}
    assert upward_imports(graph, [{"top"}, {"low"}, {"__init__"}], "pkg") == [
        "pkg.low.y imports pkg.top.x (line 2): low is below top"]
    assert upward_imports(graph, [{"top"}, {"__init__"}], "pkg")[0].startswith("pkg.low is in no layer")


def test_docs_layers_reads_the_first_column():
    text = "# x\n\n## Layers (down)\n\n```\ncli.py        typer\nbench/ train/  the work,\n               more of it\n```\n"
    assert docs_layers(text) == [{"cli"}, {"bench", "train"}]
