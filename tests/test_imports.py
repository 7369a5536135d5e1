"""The import graph of sdjax/: no circle, and every import points down the layers.

The graph is read from the source with `ast`, so an import inside a function counts as much as
one at the top of a module.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdjax"

# Low to high: a module may import from its own layer and the ones before it, never after.
# A module (or package, with everything in it) is named by its longest prefix here.
LAYERS = {
    # Libraries with no sdjax imports: the losses, the metrics, tokenizing, device layout.
    "core": (
        "sdjax",
        "sdjax.losses",
        "sdjax.metrics",
        "sdjax.reporting",
        "sdjax.tokenizer",
        "sdjax.sharding",
        "sdjax.gradient_cache",
        "sdjax.metric_writers",
    ),
    # What is trained on and what is trained: the dataset registry and builders, batching, the
    # modalities' views, the encoders and heads.
    "data and models": (
        "sdjax.modalities",
        "sdjax.datasets",
        "sdjax.input_pipeline",
        "sdjax.models",
    ),
    # Config files, profiles and checks (which know the dataset and loss registries and build
    # the encoders abstractly), and the multi-host set-up that a config asks for.
    "config": ("sdjax.config_lib", "sdjax.multihost"),
    # The training recipe, its checkpoints, and the evaluators run on its models.
    "recipe": ("sdjax.objectives", "sdjax.recipe", "sdjax.checkpointing", "sdjax.evaluators"),
    # The trainer and the entry points.
    "trainer": ("sdjax.train", "sdjax.evaluate", "sdjax.main"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the sdjax modules it imports}, for every .py file of the package."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` imports the module pkg.mod when there is one.
                imported |= {
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                }
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def layer_of(module: str) -> int:
    ranks = [
        (len(prefix), rank)
        for rank, prefixes in enumerate(LAYERS.values())
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not ranks:
        raise AssertionError(f"{module} has no layer: name it in LAYERS of {__file__}.")
    return max(ranks)[1]


def test_every_module_has_a_layer_and_imports_only_down():
    graph = import_graph()
    assert len(graph) > 30 and "sdjax.datasets.registry" in graph  # the walk found the package
    names = list(LAYERS)
    upward = [
        f"{module} ({names[layer_of(module)]}) imports {target} ({names[layer_of(target)]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` as [a, b, ..., a], or [] if it has none (depth-first)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module], path[len(path) :] = "open", [module]
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_import_graph_has_no_circle():
    assert find_cycle(import_graph()) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ],
)
def test_find_cycle_finds_a_circle_and_only_a_circle(graph, expected):
    assert find_cycle(graph) == expected


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    package = tmp_path / "sdjax"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("def f():\n    from sdjax.sub import leaf\n")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from .. import top\nimport numpy\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert import_graph() == {
        "sdjax": set(),
        "sdjax.top": {"sdjax.sub.leaf"},
        "sdjax.sub": {"sdjax.sub.leaf"},
        "sdjax.sub.leaf": {"sdjax.top"},
    }
    assert find_cycle(import_graph()) == ["sdjax.sub.leaf", "sdjax.top", "sdjax.sub.leaf"]
