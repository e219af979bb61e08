"""The project's import graph, read from the source with ``ast`` (imports inside functions included): no cycle, and
every import points down the layers of the developers' guide: fl.py and data.py at the bottom, the defenses and
the attacks above them, run.py above those, grid.py and bench.py on top, which nothing imports."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [("fl", "data"), ("fedredefense", "feddefuse", "baselines", "attacks"), ("run",), ("grid", "bench")]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imports_of(source, modules):
    """The project modules among ``modules`` that ``source`` imports, anywhere in it (a function's body too), by
    ``import m``, ``from m import x``, ``importlib.import_module("m")`` or ``__import__("m")``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found & set(modules)


def cycle(graph):
    """A cycle of ``graph`` ({module: imported modules}) as a list [a, b, ..., a], or None."""
    state, path = {}, []

    def visit(m):
        state[m], path[len(path):] = "open", [m]
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        path.pop()
        return None

    return next((found for m in sorted(graph) if m not in state and (found := visit(m))), None)


GRAPH = {m: imports_of((ROOT / f"{m}.py").read_text(), MODULES) - {m} for m in MODULES}


def test_the_checks_see_every_kind_of_import_and_a_planted_cycle():
    source = ("import fl\nfrom data import x\ndef f():\n    import run\n    importlib.import_module('grid')\n"
              "import torch\n")
    assert imports_of(source, MODULES) == {"fl", "data", "run", "grid"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYER), "place a new module in LAYERS (and in the developers' guide)"


def test_the_import_graph_has_no_cycle():
    assert cycle(GRAPH) is None, " -> ".join(cycle(GRAPH))


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    """A module imports only from its own layer or below; fl.py imports nothing from the project, and nothing
    imports grid.py or bench.py."""
    upward = sorted(m for m in GRAPH[module] if LAYER[m] > LAYER[module])
    assert not upward, f"{module}.py imports {upward} from above it"
    if module == "fl":
        assert not GRAPH[module], "fl.py is the ground floor"
    if LAYER[module] == len(LAYERS) - 1:
        assert not [m for m in MODULES if module in GRAPH[m]], f"{module}.py is on top: nothing imports it"
