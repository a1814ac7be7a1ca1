"""Every command a user runs, and the parser it runs with (for the spelling and doc-command tests).

A command is named as the docs name it: a script (``test_model.py``, ``train_BRN.py``,
``analysis/rain_detail.py``) or a module (``python -m analysis.rain_detail``). ``parser_for`` gives the
parser that command parses its flags with, built as the command builds it.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
from typing import Callable

from helpers import ROOT

# Commands whose flags a module other than themselves parses.
PARSER_MODULES = {"reproduce": "utils.paper.runner", "datasets": "utils.data.cli", "utils.metrics": "utils.eval.metric_cli"}
# Scripts that hand a first word to another module's parser: ``python reproduce.py coic_effect ...``.
SUBCOMMANDS = {("reproduce", "coic_effect"): "utils.paper.coic_effect"}
# Modules with a ``__main__`` that no user runs (a worker the benchmark starts, with its own hidden flags).
NOT_COMMANDS = {"benchmarks.published"}


def module_name(command: str) -> str:
    """``analysis/rain_detail.py`` or ``analysis.rain_detail`` -> ``analysis.rain_detail``."""
    name = command[2:] if command.startswith("./") else command
    return name[:-3].replace("/", ".") if name.endswith(".py") else name


def commands() -> list[str]:
    """Every module with a ``__main__`` block (found, not listed, so a new command is covered)."""
    found = []
    for pattern in ("*.py", "analysis/*.py", "benchmarks/*.py", "utils/*.py", "utils/*/*.py"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path, encoding="utf-8") as f:
                if 'if __name__ == "__main__":' in f.read():
                    found.append(module_name(os.path.relpath(path, ROOT).replace(os.sep, "/")))
    return [c for c in found if c not in NOT_COMMANDS]


def parser_for(command: str) -> argparse.ArgumentParser:
    """The parser ``command`` (a script path or a module name) parses its flags with."""
    name = module_name(command)
    if name.startswith("train_"):
        from utils.train.config import build_train_parser
        from utils.train.recipes import get_recipe

        return build_train_parser(get_recipe(name[len("train_"):]))
    factory: Callable[[], argparse.ArgumentParser] = importlib.import_module(PARSER_MODULES.get(name, name)).build_parser
    return factory()


def subparsers(parser: argparse.ArgumentParser):
    """``parser`` and the parsers of its sub-commands (``datasets.py demo|pairs|...``)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from subparsers(sub)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse ``[target, *args]`` (a doc command after ``python``/``-m``) as the command itself would."""
    name, args = module_name(argv[0]), argv[1:]
    sub = SUBCOMMANDS.get((name, args[0] if args else None))
    if sub is not None:
        return importlib.import_module(sub).build_parser().parse_args(args[1:])
    return parser_for(name).parse_args(args)
