"""tools/mutate.py's filter of mutants that only change the text of a string literal (hand-made diffs)."""
import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "mutate_tool", os.path.join(os.path.dirname(__file__), os.pardir, "tools", "mutate.py"))
mutate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutate)


def _diff(before: str, after: str) -> str:
    return f"--- a\n+++ b\n@@ -1 +1 @@\n-{before}\n+{after}\n"


@pytest.mark.parametrize("before, after, text_only", [
    ('    log("%d tiles", n)', '    log("XX%d tilesXX", n)', True),  # a whole statement
    ('    log("%d tiles", n)', '    log("%d tiles", n + 1)', False),
    ('                "%.2f GiB unchecked", need / 2 ** 30)', '                "%.2F GIB UNCHECKED", need / 2 ** 30)', True),
    ('                "%.2f GiB unchecked", need / 2 ** 30)', '                "%.2f GiB unchecked", need / 3 ** 30)', False),
    ('    for k in tqdm(xs, desc="tiles", leave=False,', '    for k in tqdm(xs, desc="XXtilesXX", leave=False,', True),
    ('    for k in tqdm(xs, desc="tiles", leave=False,', '    for k in tqdm(xs, desc="tiles", leave=True,', False),
    ("    pad(x, mode='reflect')", "    pad(x, mode='REFLECT')", True),
])
def test_only_changes_text(before, after, text_only):
    assert mutate.only_changes_text(_diff(before, after)) is text_only
