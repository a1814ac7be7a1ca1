"""What every command line's ``--help`` shares: each default said once.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: X)`` to every flag, also where the
help already explains its default, and prints ``(default: None)`` / ``(default: False)`` for flags
whose absence is the default. ``HelpFormatter`` appends it only where it says something.
"""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` only when the help does not state a default and X is a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)
