"""The structure's rules, checked on the source: no import cycle, libraries never import a
script, one job per module (no source file above ~450 lines except the backbone models)."""
import ast
import os

from helpers import ROOT

LIBRARY_DIRS = ("utils", "models", "analysis", "benchmarks")
SCRIPTS = {"test_model", "reproduce"} | {f[:-3] for f in os.listdir(ROOT) if f.startswith("train_") and f.endswith(".py")}
MAX_LINES = 450


def _sources():
    for folder in ("",) + LIBRARY_DIRS:
        base = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(base)):
            if name.endswith(".py"):
                rel = os.path.join(folder, name) if folder else name
                yield rel, rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def _module_level_imports(path):
    """Project modules imported when ``path`` is imported (not those imported inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _all_imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_import_cycle():
    modules = dict((mod, rel) for rel, mod in _sources())
    graph = {mod: {m for m in _module_level_imports(rel) if m in modules and m != mod} for mod, rel in modules.items()}
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
    offenders = [(rel, sorted(_all_imports(rel) & SCRIPTS)) for rel, _ in _sources()
                 if rel.split(os.sep)[0] in LIBRARY_DIRS and _all_imports(rel) & SCRIPTS]
    assert offenders == []


def test_one_job_per_module():
    long = [(rel, n) for rel, _ in _sources() if not rel.startswith("models" + os.sep) or rel.endswith(
        ("coim.py", "encoder.py", "__init__.py")) for n in [sum(1 for _ in open(os.path.join(ROOT, rel)))]
            if n > MAX_LINES]
    assert long == [], f"above {MAX_LINES} lines (two jobs?): {long}"


def test_test_files_share_helpers_not_conftest():
    """conftest.py holds fixtures and hooks only: what test files share they import from tests/helpers.py."""
    tests = os.path.join(ROOT, "tests")
    importers = [name for name in sorted(os.listdir(tests))
                 if name.endswith(".py") and "conftest" in _all_imports(os.path.join("tests", name))]
    assert not importers, f"{importers} import conftest as a module; import the helper from helpers.py instead"
