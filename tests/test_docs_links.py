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


def test_readme_backbone_table_is_the_registry():
    """The README's table of backbones lists the registry's backbones, in its order, each with its
    training script and exactly its published weights (the registry is the only list; this keeps
    the page true to it)."""
    from models import BACKBONES

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## The five backbones"):]
    section = section[:section.index("\n## ", 1)]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| backbone")]
    assert [r[0] for r in rows] == list(BACKBONES)
    for name, _, script, weights in rows:
        assert script == f"`train_{name}.py`" and os.path.isfile(os.path.join(ROOT, script.strip("`")))
        listed = () if weights == "—" else tuple(w.strip(" `") for w in weights.split(","))
        assert listed == BACKBONES[name].published_weights, name


@pytest.mark.parametrize("page", _pages())
def test_source_paths_named_in_docs_exist(page):
    """A file of this repository named in the docs (``utils/train/recipes.py``) exists: a moved or
    renamed module cannot leave the docs pointing at nothing."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    named = set(re.findall(r"\b((?:utils|models|benchmarks|analysis|tests)/[\w/]+\.(?:py|npz))", text))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} names files that do not exist: {missing}"
