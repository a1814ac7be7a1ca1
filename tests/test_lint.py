"""The tree passes ruff with the rules of pyproject.toml ([tool.ruff]), and those rules catch what we rely on.

Planted snippets go to ruff on stdin under a file name inside the tree (``--stdin-filename``), so ruff
finds pyproject.toml the way it does for the real files, and nothing is written into the tree.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

# Rule families the tree relies on: syntax errors (E9), pyflakes (F), import placement (E4),
# statement pitfalls (E7), invalid escapes (W6), bugbear's mutable defaults and friends (B0).
REQUIRED_FAMILIES = {"E4", "E7", "E9", "F", "W6", "B0"}
PLANTED_NAME = os.path.join(ROOT, "tests", "_planted_lint_sample.py")
SYNTAX_CODES = {"E999", "invalid-syntax"}  # ruff < 0.5 called syntax errors E999

# (code ruff must report, and nothing else; source with exactly one such violation)
VIOLATIONS = [
    ("F401", "import os\n"),
    ("F821", "print(undefined_name)\n"),
    ("F841", "def f():\n    unused = 1\n"),
    ("E402", "import sys\n\nx = 1\nimport os  # after a statement\n\nprint(sys, os, x)\n"),
    ("E711", "def f(x):\n    return x == None\n"),
    ("E722", "def f():\n    try:\n        pass\n    except:\n        pass\n"),
    ("W605", "pattern = '\\d+'\n"),
    ("B006", "def f(items=[]):\n    return items\n"),
]


def _ruff() -> list:
    if shutil.which("ruff"):
        return ["ruff"]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (pip install -r requirements.txt)")
    return [sys.executable, "-m", "ruff"]


def _lint_source(source: str) -> list:
    """The rule codes ruff reports for ``source`` as if it were a file of tests/."""
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "json",
                                     "--stdin-filename", PLANTED_NAME, "-"],
                          input=source, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return sorted(d["code"] for d in json.loads(proc.stdout))


def _ruff_config() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["ruff"]


def _selected(code: str, select: list) -> bool:
    return any(code.startswith(prefix) for prefix in select)


def test_config_selects_the_families_we_rely_on():
    config = _ruff_config()
    select = config["lint"]["select"]
    assert REQUIRED_FAMILIES <= set(select), sorted(REQUIRED_FAMILIES - set(select))
    assert config["line-length"] == 120
    # Every planted violation below belongs to a selected family.
    assert all(_selected(code, select) for code, _ in VIOLATIONS)


@pytest.mark.parametrize("code, source", VIOLATIONS, ids=[c for c, _ in VIOLATIONS])
def test_ruff_reports_a_planted_violation(code, source):
    assert _lint_source(source) == [code]


def test_ruff_reports_a_syntax_error():
    codes = _lint_source("def f(:\n    pass\n")
    assert codes and set(codes) <= SYNTAX_CODES, codes


def test_clean_source_and_long_lines_pass():
    assert _lint_source("import os\n\nprint(os.sep)\n") == []
    # E501 is not selected: a 130-character line is no lint error here.
    long_line = "text = '" + "a" * 120 + "'\n"
    assert len(long_line) > 121
    assert _lint_source(long_line) == []


def test_ruff_passes_on_the_tree():
    listed = subprocess.run(_ruff() + ["check", "--no-cache", "--show-files", ROOT],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    files = {os.path.relpath(line.strip(), ROOT) for line in listed.stdout.splitlines() if line.strip()}
    # The check covers the code, not only a corner of the tree.
    for path in ("models/dgunet.py", "analysis/common.py", "tests/test_lint.py", "utils/checkpoint.py"):
        assert path in files, path
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", ROOT],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
