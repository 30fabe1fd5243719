"""The code's structure: layers that point one way, no import cycle, no import hidden in a function to dodge
one, no module over about 400 lines, and the method registry as the only place a method is listed."""
import ast
from pathlib import Path

import pytest

from ldm.erasure import methods
from ldm.paths import REPO_ROOT

LDM = REPO_ROOT / "ldm"
SCRIPTS = [*sorted((REPO_ROOT / "train-scripts").glob("*.py")), *sorted((REPO_ROOT / "eval-scripts").glob("*.py")),
           *sorted((REPO_ROOT / "bench").glob("*.py")), REPO_ROOT / "app.py"]
MAX_LINES = 400

# Lower layers never import higher ones. The run-folder format knows no method and no loading; the methods'
# maths and trainers know no loading; the registry sits on the methods; loading applies a run's edit through
# the registry; orchestration (erase, concept images, reports, benchmark, demo) sits on loading.
LAYERS = [
    ("format", ["ldm.paths", "ldm.util", "ldm.identity", "ldm.runs"]),
    ("methods", ["ldm.erasure.settings", "ldm.erasure.trainer", "ldm.erasure.esd", "ldm.erasure.cie",
                 "ldm.erasure.sepce", "ldm.erasure.cpe", "ldm.erasure.cpe_gates", "ldm.erasure.cpe_prompts",
                 "ldm.erasure.folding"]),
    ("registry", ["ldm.erasure.methods"]),
    ("loading", ["ldm.loading"]),
    ("orchestration", ["ldm.text2image", "ldm.erasure.erase", "ldm.erasure.concept_data", "ldm.erasure.outputs",
                       "ldm.erasure.report", "ldm.leaderboard", "ldm.demo", "ldm.attacks.harness"]),
]


def module_name(path):
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def ldm_modules():
    return {module_name(p): p for p in sorted(LDM.rglob("*.py"))}


def imports_of(path, top_level_only=False):
    """The ``ldm`` modules a file imports (``from ldm.x import y`` counts ``ldm.x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ldm")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(ldm_modules())


def test_no_import_cycle_in_ldm():
    graph = {name: imports_of(path) - {name} for name, path in ldm_modules().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_no_ldm_import_inside_a_function():
    hidden = []
    for name, path in ldm_modules().items():
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm"):
                    hidden.append(f"{name}.{function.name}: from {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("ldm") for a in node.names):
                    hidden.append(f"{name}.{function.name}: import")
    assert not hidden, f"function-local imports of ldm modules: {hidden}"


def test_layers_point_one_way():
    rank = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    assert set(rank) <= set(ldm_modules()), "a layer names a module that does not exist"
    upward = [f"{module} ({LAYERS[rank[module]][0]}) imports {other} ({LAYERS[rank[other]][0]})"
              for module in rank for other in imports_of(ldm_modules()[module])
              if other in rank and rank[other] > rank[module]]
    assert not upward, upward


@pytest.mark.parametrize("path", [*ldm_modules().values(), *SCRIPTS], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def string_constants(path):
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_the_registry_is_the_only_place_a_method_is_named():
    """No module but the registry names a method (as a string a switch or a table would use); a per-method
    entry point ``train-<name>.py`` names only its own method."""
    names = set(methods.METHODS)
    offenders = []
    for path in [*ldm_modules().values(), *SCRIPTS]:
        if path == LDM / "erasure" / "methods.py":
            continue
        own = {path.stem.removeprefix("train-")} if path.parent.name == "train-scripts" else set()
        named = (string_constants(path) & names) - own
        if named:
            offenders.append(f"{path.relative_to(REPO_ROOT)}: {sorted(named)}")
    assert not offenders, offenders


def test_every_registered_method_is_complete():
    for method in methods.REGISTRY:
        assert method.description and callable(method.build) and callable(method.apply)
        assert callable(method.apply_to_diffusers) and callable(method.run_name)
        assert set(method.bars) == set(methods.ESD_BARS)
        assert method.max_devices in (1, 2)
    assert methods.benchmarked() and set(methods.benchmarked()) <= set(methods.METHODS)
