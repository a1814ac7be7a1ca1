"""The structure's rules, checked on the source.

- No import cycle; libraries never import a script.
- Floors: every import points down (or sideways within a floor), never up.
  0. ``utils/*.py``: the shared ground floor (errors, io, images, checkpoint, metrics, ...);
  1. ``models/``, ``losses.py``, ``utils/data/`` and ``datasets.py``;
  2. ``utils/eval/``; 3. ``utils/train/``; 4. ``utils/paper/``; 5. ``analysis/``, ``benchmarks/``.
  An ``if __name__ == "__main__":`` block is an entry point, not a dependency, and is not counted.
- One job per module: no source file above ~450 lines except the backbone models; no folder of
  more than 15 modules.
"""
import ast
import os

import pytest
from helpers import ROOT

LIBRARY_DIRS = ("utils", "models", "analysis", "benchmarks")
SCRIPTS = {"test_model", "reproduce", "export"} | {f[:-3] for f in os.listdir(ROOT)
                                                  if f.startswith("train_") and f.endswith(".py")}
MAX_LINES = 450
MAX_MODULES = 15


def floor(module: str) -> int:
    """The floor of a project module (dotted name); scripts are above every library."""
    top = module.split(".")[0]
    if top == "utils":
        wing = module.split(".")[1] if module.count(".") >= 1 else ""
        return {"data": 1, "eval": 2, "train": 3, "paper": 4}.get(wing, 0)
    if top in ("models", "losses", "datasets"):
        return 1
    if top in ("analysis", "benchmarks"):
        return 5
    return 6  # a script


def _sources():
    """(path relative to ROOT, dotted module name) of every Python file outside tests/."""
    for folder in ("",) + LIBRARY_DIRS:
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__") if folder else []
            for name in sorted(filenames):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
                    yield rel, rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(path: str, module_level_only: bool) -> set:
    """Dotted names imported by ``path``: at module level only, or anywhere outside a main guard."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    nodes = []
    if module_level_only:
        nodes = list(tree.body)
    else:
        for top in tree.body:
            if not _is_main_guard(top):
                nodes.extend(ast.walk(top))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _project_deps(rel: str, modules: dict, module_level_only: bool) -> set:
    return {m for m in _imports(rel, module_level_only) if m in modules}


def test_no_import_cycle():
    modules = dict((mod, rel) for rel, mod in _sources())
    graph = {mod: _project_deps(rel, modules, True) - {mod} for mod, rel in modules.items()}
    state = {}

    def visit(mod, path):
        state[mod] = "open"
        for dep in graph[mod]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [mod, dep]))
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = "done"

    for mod in graph:
        if mod not in state:
            visit(mod, [])


def test_libraries_never_import_scripts():
    offenders = [(rel, sorted({m.split(".")[0] for m in _imports(rel, False)} & SCRIPTS)) for rel, _ in _sources()
                 if rel.split(os.sep)[0] in LIBRARY_DIRS and {m.split(".")[0] for m in _imports(rel, False)} & SCRIPTS]
    assert offenders == []


def test_no_import_runs_up_a_floor():
    modules = dict((mod, rel) for rel, mod in _sources())
    modules.pop("utils", None)  # the package itself (its __init__ is a docstring)
    upward = sorted((mod, dep) for mod, rel in modules.items() for dep in _project_deps(rel, modules, False)
                    if floor(dep) > floor(mod))
    assert upward == [], "imports that run up a floor: " + ", ".join(f"{a} -> {b}" for a, b in upward)


@pytest.mark.parametrize("module, expected", [
    ("utils.errors", 0), ("utils.metrics", 0), ("utils.data.layouts", 1), ("models.pretrained", 1),
    ("datasets", 1), ("losses", 1), ("utils.eval.evaluation", 2), ("utils.train.trainer", 3),
    ("utils.paper.runner", 4), ("benchmarks.inference", 5), ("test_model", 6)])
def test_floors_are_assigned_as_drawn(module, expected):
    assert floor(module) == expected


def test_one_job_per_module():
    exempt = ("coim.py", "encoder.py", "__init__.py", "pretrained.py")  # models/ files that are not backbones
    long = [(rel, n) for rel, _ in _sources() if not rel.startswith("models" + os.sep) or rel.endswith(exempt)
            for n in [sum(1 for _ in open(os.path.join(ROOT, rel)))] if n > MAX_LINES]
    assert long == [], f"above {MAX_LINES} lines (two jobs?): {long}"


def test_no_crowded_folder():
    folders = {}
    for rel, _ in _sources():
        if not rel.endswith("__init__.py"):
            folders.setdefault(os.path.dirname(rel) or ".", []).append(rel)
    crowded = {f: len(v) for f, v in folders.items() if f != "." and len(v) > MAX_MODULES}
    assert crowded == {}, f"folders of more than {MAX_MODULES} modules: {crowded}"


def test_test_files_share_helpers_not_conftest():
    """conftest.py holds fixtures and hooks only: what test files share they import from tests/helpers.py."""
    tests = os.path.join(ROOT, "tests")
    importers = [name for name in sorted(os.listdir(tests))
                 if name.endswith(".py") and any(m.split(".")[0] == "conftest"
                                                 for m in _imports(os.path.join("tests", name), False))]
    assert not importers, f"{importers} import conftest as a module; import the helper from helpers.py instead"


def test_tools_run_as_modules_without_patching_sys_path():
    """``python -m analysis.<tool>`` / ``python -m benchmarks.<tool>`` from the root find the project by
    themselves. benchmarks/published.py is the exception: its worker runs inside the authors' checkout
    and must put their ``models`` package before ours."""
    patching = []
    for rel, _ in _sources():
        if rel.split(os.sep)[0] in ("analysis", "benchmarks") and rel != os.path.join("benchmarks", "published.py"):
            tree = ast.parse(open(os.path.join(ROOT, rel)).read())
            if any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
                   and n.value.id == "sys" for n in ast.walk(tree)):
                patching.append(rel)
    assert patching == [], f"modules that touch sys.path: {patching}"
