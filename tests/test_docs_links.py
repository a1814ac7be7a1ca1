"""Every relative link of README.md and docs/*.md resolves to a file or folder of the tree (and an
anchor of a Markdown target to one of its headings)."""
import os
import re

import pytest
from helpers import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))


def _anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


def _relative_links(page: str) -> list[str]:
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page), encoding="utf-8").read(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", _pages())
def test_relative_links_resolve(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(full), f"{page}: broken link {target}"
        if anchor and full.endswith(".md"):
            assert anchor in _anchors(full), f"{page}: no heading for #{anchor} in {os.path.relpath(full, ROOT)}"


def test_the_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](nowhere.md) [b](https://example.org) [c](#licence-and-citation)\n```\n[d](x.md)\n```\n")
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    assert [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)] == ["nowhere.md", "#licence-and-citation"]
    assert "licence-and-citation" in _anchors(os.path.join(ROOT, "README.md"))


def test_the_tables_of_backbones_are_the_registrys():
    """README.md's table of backbones and docs/training.md's recipes are rendered from models/__init__.py
    (``python -m utils.train.backbone_tables`` rewrites them): no page keeps a list of its own."""
    from utils.train.backbone_tables import stale_pages

    assert stale_pages() == [], "run: python -m utils.train.backbone_tables"


def test_the_table_check_sees_a_stale_or_missing_table(tmp_path):
    from models import available_models
    from utils.train.backbone_tables import TABLES, current_table, replace_table, stale_pages, write_tables

    for page, _ in TABLES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text(open(os.path.join(ROOT, page), encoding="utf-8").read(), encoding="utf-8")
    assert stale_pages(str(tmp_path)) == []
    readme = tmp_path / "README.md"
    text = readme.read_text(encoding="utf-8")
    rows = current_table(text, "backbones")
    assert rows[2].startswith("| BRN | ") and len(rows) == 2 + len(available_models())
    readme.write_text(replace_table(text, "backbones", rows[:-1]), encoding="utf-8")  # a backbone dropped
    assert stale_pages(str(tmp_path)) == ["README.md (backbones)"]
    assert write_tables(str(tmp_path)) == ["README.md"] and stale_pages(str(tmp_path)) == []
    assert readme.read_text(encoding="utf-8") == text  # rewritten, not appended: prose kept
    readme.write_text(text.replace("<!-- /generated: backbones -->", ""), encoding="utf-8")
    assert stale_pages(str(tmp_path)) == ["README.md (backbones)"]  # markers gone: never silently skipped


@pytest.mark.parametrize("page", _pages())
def test_source_paths_named_in_docs_exist(page):
    """A file of this repository named in the docs (``utils/train/recipes.py``) exists: a moved or
    renamed module cannot leave the docs pointing at nothing."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    named = set(re.findall(r"\b((?:utils|models|benchmarks|analysis|tests)/[\w/]+\.(?:py|npz))", text))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} names files that do not exist: {missing}"


SECTION_IN_CODE = re.compile(r"docs/([\w-]+\.md), '([^']+)'")


def test_sections_the_code_names_exist():
    """Messages that send the user to "docs/<page>.md, '<Heading>'" name a heading of that page."""
    found = 0
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("mutants", "tests", "runs", "node_modules")]
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                for page, heading in SECTION_IN_CODE.findall(text):
                    found += 1
                    headings = {line.lstrip("#").strip() for line in open(os.path.join(ROOT, "docs", page),
                                                                          encoding="utf-8") if line.startswith("#")}
                    assert heading in headings, f"{name}: docs/{page} has no heading {heading!r}"
    assert found  # the pattern still matches the messages
