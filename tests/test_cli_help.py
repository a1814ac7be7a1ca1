"""Every command line's ``--help`` says each default once, and never ``(default: None)``."""
import argparse
import importlib
import os
import re

import pytest
from entry_points import subparsers
from helpers import ROOT

from models import available_models
from utils.cli import HelpFormatter


def _modules_with_a_parser() -> list[str]:
    """Every module of the tree that defines ``build_parser`` (found, not listed, so a new CLI is covered)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "runs", "checkpoints", "datasets", "mutants")]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and "def build_parser(" in open(path, encoding="utf-8").read():
                found.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return sorted(found)


def _option_blocks(text: str) -> list[str]:
    """The help text of each option: its first line and the indented lines that continue it."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"^ {2}-", line) or re.match(r"^ {2}\S", line):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
    return blocks


def _check(parser: argparse.ArgumentParser) -> None:
    for p in subparsers(parser):
        text = p.format_help()
        for block in _option_blocks(text):
            assert block.count("(default") <= 1, block
            assert "(default: None)" not in block and "(default: False)" not in block, block


MODULES = _modules_with_a_parser()


def test_every_parser_is_found():
    assert {"test_model", "utils.paper.runner", "benchmarks.inference", "analysis.model_cost"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_help_says_each_default_once(module):
    _check(importlib.import_module(module).build_parser())


@pytest.mark.parametrize("name", available_models())
def test_train_help_says_each_default_once(name):
    from utils.train.config import build_train_parser
    from utils.train.recipes import get_recipe

    _check(build_train_parser(get_recipe(name)))


def test_the_formatter_keeps_a_value_default_and_drops_the_rest():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--size", type=int, default=32, help="tile size")
    p.add_argument("--path", default=None, help="a path")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--mode", default="a", help="mode (default: a for files, else b)")
    blocks = {b.split()[0]: b for b in _option_blocks(p.format_help())}
    assert blocks["--size"].endswith("tile size (default: 32)")
    assert blocks["--path"].endswith("a path") and blocks["--flag"].endswith("a switch")
    assert blocks["--mode"].count("(default") == 1
