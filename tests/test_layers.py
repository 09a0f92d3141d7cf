"""The import layers of diffroute, checked on the source (every import statement, at module level or inside a
function): the subpackages form no circle, core imports none of the methods, nothing in the library imports the
eval suite, the app or the CLI, and only the zoo imports the pipelines."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "diffroute": "diffroute",
    "eval": "diffroute.eval",
    "app": "diffroute.app",
    "pipelines": "diffroute.pipelines",
}
# diffroute's top-level modules that are not subpackages: the public entry points, which may import anything
ENTRY = {"diffroute", "diffroute.__main__"}
METHODS = {"plans", "policies", "routers", "surgery", "training", "experts"}
ABOVE_LIBRARY = {"eval", "app", "cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "diffroute" or n.startswith("diffroute.")}


def _unit(module: str) -> str:
    """The subpackage a module belongs to (`core`, `eval`, ...), or the module itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_graph() -> dict[str, set[str]]:
    """Module -> the diffroute modules it imports (the public entry points left out)."""
    modules = _modules()
    graph = defaultdict(set)
    for module, path in modules.items():
        if module in ENTRY:
            continue
        for name in _imports(path):
            target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in modules), None)
            if target is not None and target != module and target not in ENTRY:
                graph[module].add(target)
    return graph


def _graph() -> dict[str, set[str]]:
    """The module graph seen from above: subpackage -> the other subpackages it imports."""
    graph = defaultdict(set)
    for module, targets in _module_graph().items():
        graph[_unit(module)].update(_unit(t) for t in targets if _unit(t) != _unit(module))
    return graph


def test_subpackages_form_no_circle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles between subpackages:\n" + "\n".join(cycles)


def test_core_imports_no_method_and_the_library_nothing_above_it():
    graph = _graph()
    assert not graph["core"] & METHODS, f"core imports {graph['core'] & METHODS}"
    library = [u for u in graph if u not in ABOVE_LIBRARY]
    upward = {u: graph[u] & ABOVE_LIBRARY for u in library if graph[u] & ABOVE_LIBRARY}
    assert not upward, f"library subpackages import the eval suite, app or CLI: {upward}"
    pipelines = {u for u in library if "pipelines" in graph[u] and u not in ("zoo",)}
    assert not pipelines, f"only the zoo builds pipelines; also imported by {pipelines}"


def test_the_checker_sees_imports_inside_functions():
    """The checks read imports made inside functions too (the lazy ones that used to hide the circles)."""
    tree = _imports(ROOT / "diffroute" / "zoo" / "registry.py")
    assert "diffroute.pipelines" in tree


def test_modules_form_no_circle():
    """Within subpackages too: no module imports one that (through others) imports it back."""
    graph, modules = _module_graph(), _modules()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(modules):
        if module not in index and module not in ENTRY:
            strong(module)
    assert not circles, f"import circles: {circles}"


def test_every_training_method_is_one_registration_whose_config_holds_the_cli_defaults(tmp_path):
    from dataclasses import fields

    from diffroute.cli.main import build_parser
    from diffroute.training.methods import METHODS

    assert set(METHODS) == {
        "l2c",
        "gates",
        "elastic",
        "moe",
        "dar",
        "dtr",
        "plain",
        "fera",
        "lora",
        "expert",
        "experts-router",
    }
    # options without a default (the user must name them) are given real files; every other keeps its default
    import json

    import numpy as np

    from diffroute.experts.partition import Partition

    partition = Partition(2, np.arange(4), np.array([0, 1, 0, 1]), np.zeros((2, 3), np.float32))
    partition.save(tmp_path / "partition.json")
    experts = []
    for i in range(2):
        (tmp_path / f"e{i}").mkdir()
        (tmp_path / f"e{i}" / "expert.json").write_text(
            json.dumps({"partition": partition.fingerprint(), "cluster": i})
        )
        experts.append(str(tmp_path / f"e{i}"))
    required = {
        "expert": {"partition": tmp_path, "cluster": 0},
        "experts-router": {"partition": tmp_path, "experts": ",".join(experts)},
    }
    for name, method in METHODS.items():
        given = required.get(name, {})
        options = [x for k, v in given.items() for x in (f"--{k}", str(v))]
        args = build_parser().parse_args(["train", name, "--out", "x", *options])
        for f in fields(method.config):
            if hasattr(args, f.name) and f.name not in method.fixed and f.name not in given:
                assert getattr(args, f.name) == method.defaults()[f.name], (name, f.name)
        assert method.make_config(args).__class__ is method.config
