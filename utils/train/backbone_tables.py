"""The docs' tables of backbones, rendered from the registry (``models.BACKBONES``).

README.md's table of backbones and docs/training.md's table of recipes are generated: each sits
between two markers, ``<!-- generated: NAME ... -->`` and ``<!-- /generated: NAME -->``, and a new or
changed registry entry reaches them with

    python -m utils.train.backbone_tables           # rewrite the tables in place
    python -m utils.train.backbone_tables --check   # exit 1, naming the page, when one is out of date

(tests/test_docs_links.py runs the check). Everything outside the markers is prose, left alone.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Optional, Sequence

import losses
from models import BACKBONES, Backbone, CosineOverRun, CosineRestarts, Flag, MultiStep, Training
from utils.cli import HelpFormatter
from utils.io import atomic_write_text
from utils.tables import markdown_table
from utils.train.recipes import OPTIMIZERS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _number(value: float) -> str:
    """1e-3, 0.2, 260k: as the published scripts' readers write them."""
    if isinstance(value, int) and value >= 1000 and value % 1000 == 0:
        return f"{value // 1000}k"
    return f"{value:g}"


def _rate(value: float) -> str:
    """1e-3, 2e-4: learning rates as the papers write them."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _flag(name: str, flag: Flag) -> str:
    if flag.default is None:
        return f"--{name}"
    values = flag.default if isinstance(flag.default, (list, tuple)) else [flag.default]
    return f"--{name} " + " ".join(str(v) for v in values)


def _loss(name: str) -> str:
    """The loss class and the formula of its docstring's first paragraph (``|`` escaped for the table)."""
    doc = " ".join((getattr(losses, name).__doc__ or "").strip().split("\n\n")[0].split())
    return f"`{name}`: " + doc.rstrip(".").replace("|", "\\|")


def _optimizer(training: Training, flags: dict) -> str:
    doc = (OPTIMIZERS[training.optimizer].__doc__ or "").strip().split(";")[0].split(" with ")[0].rstrip(".")
    parts = [f"{doc} {_rate(training.lr)}"]
    s = training.schedule
    if isinstance(s, MultiStep):
        epochs = flags[s.flag].default
        parts.append(f"×{s.gamma:g} at epochs {'/'.join(str(e) for e in epochs)}")
    elif isinstance(s, CosineOverRun):
        parts.append(f"cosine to {_rate(s.eta_min)} over the run")
    elif isinstance(s, CosineRestarts):
        parts.append(f"cosine restarts [{', '.join(_number(p) for p in s.periods)}] → "
                     f"[{', '.join(_rate(e) for e in s.eta_mins)}] per iteration")
    if training.grad_clip is not None:
        parts.append(f"grad-norm clip {training.grad_clip:g}")
    return ", ".join(parts)


def readme_table(backbones: Optional[dict[str, Backbone]] = None) -> list[str]:
    """README.md's table: what each backbone is, its training script, its published weights."""
    rows = [[b.name, f"{b.summary} ({b.citation})", f"`train_{b.name}.py`",
             ", ".join(f"`{w}`" for w in b.published_weights) or "—"]
            for b in (backbones or BACKBONES).values()]
    return markdown_table(["backbone", "what it is", "train", "published weights (`--test_model NAME`)"], rows)


def recipe_table(backbones: Optional[dict[str, Backbone]] = None) -> list[str]:
    """docs/training.md's table: each backbone's reference training settings (its train script's defaults)."""
    rows = []
    for b in (backbones or BACKBONES).values():
        t = b.training
        flags = " ".join(_flag(n, f) for n, f in t.flags.items())
        rows.append([b.name, f"`{flags}`" if flags else "", _loss(t.loss), _optimizer(t, t.flags),
                     f"{t.batch_size} / {t.crop_size}", _number(t.tot_iters), f"{t.contra_loss_weight:g}"])
    return markdown_table(["backbone", "own flags", "loss", "optimizer / schedule", "batch / crop", "iterations",
                           "contra weight"], rows)


# (page, block name) -> its renderer.
TABLES: dict[tuple[str, str], Callable[[], list[str]]] = {
    ("README.md", "backbones"): readme_table,
    (os.path.join("docs", "training.md"), "recipes"): recipe_table,
}


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {name}\b[^\n]*-->\n)(.*?)(<!-- /generated: {name} -->)", re.S)


def current_table(text: str, name: str) -> Optional[list[str]]:
    """The lines between the markers of block ``name`` in ``text``; None when the page has no such block."""
    match = _block(name).search(text)
    return None if match is None else match.group(2).strip("\n").splitlines()


def replace_table(text: str, name: str, lines: list[str]) -> str:
    return _block(name).sub(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(3), text, count=1)


def stale_pages(root: str = REPO_ROOT) -> list[str]:
    """'page (block)' for each generated table that differs from the registry, or whose markers are gone."""
    stale = []
    for (page, name), render in TABLES.items():
        with open(os.path.join(root, page), encoding="utf-8") as f:
            if current_table(f.read(), name) != render():
                stale.append(f"{page} ({name})")
    return stale


def write_tables(root: str = REPO_ROOT) -> list[str]:
    """Rewrite every generated table from the registry; the pages changed."""
    changed = []
    for (page, name), render in TABLES.items():
        path = os.path.join(root, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if current_table(text, name) is None:
            raise SystemExit(f"error: {page} has no <!-- generated: {name} --> ... <!-- /generated: {name} --> "
                             "markers: put them around the table")
        new = replace_table(text, name, render())
        if new != text:
            atomic_write_text(path, new)
            changed.append(page)
    return changed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rewrite the docs' tables of backbones from models/__init__.py.",
                                formatter_class=HelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"out of date: {page} (python -m utils.train.backbone_tables rewrites it)")
        return 1 if stale else 0
    for page in write_tables():
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
