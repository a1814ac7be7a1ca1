"""The tree passes ruff with the rules of pyproject.toml ([tool.ruff])."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def _ruff() -> list:
    if shutil.which("ruff"):
        return ["ruff"]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (pip install -r requirements.txt)")
    return [sys.executable, "-m", "ruff"]


def test_ruff_passes_on_the_tree():
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", ROOT],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.path.isfile(os.path.join(ROOT, "pyproject.toml"))
