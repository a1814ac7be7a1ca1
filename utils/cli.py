"""What every command line shares: one spelling per concept, one list syntax, one device rule, and
``--help`` that states each default once.

- ``Parser``: an ``argparse.ArgumentParser`` with this project's help formatter, whose required
  flags may also be given by a deprecated alias.
- ``add_alias``: an old spelling of a flag that still works, prints one
  ``note: --old is deprecated; use --new`` line to stderr and then does exactly what the new flag does.
- ``add_list``: a list flag that takes ``a b c``, ``a,b,c`` or any mix (``ListAction``).
- ``add_device_args``: ``--use_GPU`` and ``--gpu_id`` (the published scripts' names); ``--device``
  stays as an alias. Every command runs on the CPU unless ``--use_GPU`` is given.
- ``add_precision_args``: ``--precision`` and ``--memory_format``; ``--amp``, ``--channels_last`` and
  ``--recommended`` stay as aliases.

``CANONICAL`` names each concept's one spelling and the spellings it replaced;
tests/test_cli_spelling.py walks every command's parser against it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["HelpFormatter", "Parser", "ListAction", "add_alias", "add_list", "add_device_args", "add_precision_args",
           "split_list", "CANONICAL", "PRECISIONS", "MEMORY_FORMATS"]

# concept -> (the one spelling, the old spellings that remain as deprecated aliases)
CANONICAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "encoder file": ("--feat_ext", ("--pretrained_encoder", "--encoder")),
    "model file": ("--test_model", ("--checkpoint", "--checkpoints")),
    "output": ("--save_path", ("--out",)),
    "GPU": ("--use_GPU", ("--device",)),
    "GPU index": ("--gpu_id", ()),
    "precision": ("--precision", ("--amp", "--recommended")),
    "memory format": ("--memory_format", ("--channels_last",)),
    "backbones to run": ("--models", ("--names", "--backbones")),
    "one backbone": ("--model_name", ()),
}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` only when the help does not state a default and X is a value.

    argparse's ``ArgumentDefaultsHelpFormatter`` appends it to every flag, also where the help
    already explains its default, and prints ``(default: None)`` for flags whose absence is the default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0
                or isinstance(action, ListAction) and not action.default):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with ``HelpFormatter``, whose required flags an alias may also give.

    argparse counts a required flag as given only when its own option string was seen, so a flag
    with an alias (``export.py --out``) is made optional at parse time and checked here instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):
        ns, rest = super().parse_known_args(args, namespace)
        missing = [a.option_strings[0] for a in self._actions
                   if getattr(a, "required_with_alias", False) and getattr(ns, a.dest, None) is None]
        if missing:
            self.error("the following arguments are required: " + ", ".join(missing))
        return ns, rest


def split_list(values: Sequence[str] | str) -> list[str]:
    """``["a", "b,c"]`` -> ``["a", "b", "c"]``: the shell's spaces and commas both separate (a space
    inside one quoted value does not: ``"my photos/a.jpg"`` stays one path)."""
    values = [values] if isinstance(values, str) else values
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


class ListAction(argparse.Action):
    """A list flag: space-separated values, comma-separated ones, or both (``--testset A,B C``).

    Each item is converted with ``item_type`` and checked against ``item_choices`` after splitting
    (argparse itself would see ``A,B`` as one value).
    """

    def __init__(self, option_strings: list[str], dest: str, item_type: Callable[[str], Any] = str,
                 item_choices: Optional[Sequence[Any]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.item_type, self.item_choices = item_type, item_choices

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = []
        for text in split_list(values):
            try:
                item = self.item_type(text)
            except (TypeError, ValueError):
                name = getattr(self.item_type, "__name__", "")
                raise argparse.ArgumentError(self, f"invalid {name} value: {text!r}") from None
            if self.item_choices is not None and item not in self.item_choices:
                raise argparse.ArgumentError(self, f"invalid choice: {text!r} (choose from "
                                                   + ", ".join(map(str, self.item_choices)) + ")")
            items.append(item)
        if not items and self.nargs != "*":
            raise argparse.ArgumentError(self, "expected at least one value")
        setattr(namespace, self.dest, items)


def add_list(p, *flags: str, type: Callable[[str], Any] = str, choices: Optional[Sequence[Any]] = None,
             **kwargs: Any) -> argparse.Action:
    """A ``ListAction`` flag on ``p`` (a parser or a group): ``--x a b``, ``--x a,b`` and ``--x a,b c`` agree."""
    if choices is not None and "metavar" not in kwargs:
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    return p.add_argument(*flags, action=ListAction, item_type=type, item_choices=choices, **kwargs)


class _Alias(argparse.Action):
    """A deprecated spelling: one note on stderr, then ``apply(parser, namespace, values)``."""

    def __init__(self, option_strings: list[str], dest: str, apply: Callable[..., None], use: str,
                 canonical: str, **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.apply, self.use, self.canonical = apply, use, canonical

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is deprecated; use {self.use}", file=sys.stderr)
        self.apply(parser, namespace, values)


def add_alias(p, old: str, canonical: str, apply: Optional[Callable[..., None]] = None,
              use: Optional[str] = None, nargs: Any = None,
              choices: Optional[Sequence[Any]] = None) -> argparse.Action:
    """Accept ``old`` for the flag ``canonical`` already on ``p`` (a parser or a group).

    Without ``apply`` the alias takes the values the canonical flag takes and hands them to its
    action, so both behave identically; ``apply(parser, namespace, values)`` maps an alias whose
    values differ (``--device cuda:1``). ``use`` is what the note tells the user to type instead.
    The alias is left out of ``--help``.
    """
    target = p._option_string_actions[canonical]
    if apply is None:
        def apply(parser, namespace, values):
            target(parser, namespace, values, canonical)
        nargs = target.nargs if nargs is None else nargs
        kwargs = {"nargs": nargs, "type": target.type, "choices": target.choices, "metavar": target.metavar}
        if isinstance(target, ListAction):
            kwargs.update(type=None, choices=None)  # the target's action splits and checks the items
    else:
        kwargs = {"nargs": nargs, "choices": choices}
    if target.required:
        target.required, target.required_with_alias = False, True
    return p.add_argument(old, action=_Alias, apply=apply, use=use or canonical, canonical=canonical, **kwargs)


def _device_alias(parser, namespace, value: str) -> None:
    """``--device cpu|cuda|cuda:N`` as ``--use_GPU --gpu_id N`` (or neither)."""
    kind, _, index = value.partition(":")
    if kind == "cpu" and not index:
        namespace.use_GPU = False
    elif kind == "cuda" and (not index or index.isdigit()):
        namespace.use_GPU = True
        if index:
            namespace.gpu_id = index
    else:
        parser.error(f"--device {value}: only cpu, cuda and cuda:N; use --use_GPU --gpu_id N for a GPU, "
                     "nothing for the CPU")


def add_device_args(p, verb: str = "run") -> None:
    """``--use_GPU`` and ``--gpu_id`` (what ``utils.train.distributed.resolve_device`` reads) on
    ``p`` (a parser or group), with ``--device`` as an alias: the CPU unless ``--use_GPU``."""
    p.add_argument("--use_GPU", action="store_true", help=f"{verb} on CUDA (device cuda:<gpu_id>; default: the CPU)")
    p.add_argument("--gpu_id", default="0", help="CUDA device index used with --use_GPU")
    add_alias(p, "--device", "--use_GPU", apply=_device_alias, use="--use_GPU --gpu_id N (or nothing for the CPU)")


def add_precision_args(p, precision_help: str, memory_help: str, recommended: bool = True) -> None:
    """``--precision {auto,fp32,bf16,fp16}`` and ``--memory_format {auto,contiguous,channels_last}``
    on ``p`` (a parser or group), with the old knobs as aliases: ``--amp off|bf16|fp16`` is
    ``--precision fp32|bf16|fp16`` (in the default layout unless a memory format is given, as it
    was), ``--channels_last`` is ``--memory_format channels_last``, and ``--recommended`` (where
    ``recommended``) is this machine's fastest setting, ``utils.eval.precision.recommended_setting``."""
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)
    p.add_argument("--memory_format", default="auto", choices=MEMORY_FORMATS, help=memory_help)

    def amp(parser, namespace, value):
        namespace.precision = "fp32" if value == "off" else value
        if namespace.memory_format == "auto":
            namespace.memory_format = "contiguous"

    add_alias(p, "--amp", "--precision", apply=amp, use="--precision fp32|bf16|fp16", choices=["off", "bf16", "fp16"])
    add_alias(p, "--channels_last", "--memory_format", nargs=0, use="--memory_format channels_last",
              apply=lambda parser, namespace, values: setattr(namespace, "memory_format", "channels_last"))
    if recommended:
        # The machine's fastest setting (bf16 on a GPU or a CPU that computes it natively, else
        # float32 in the layout timed faster): not one value of --precision, so it keeps a marker.
        add_alias(p, "--recommended", "--precision", nargs=0,
                  use="--precision bf16 on a GPU or a CPU with native bf16, --precision fp32 elsewhere",
                  apply=lambda parser, namespace, values: setattr(namespace, "precision", "recommended"))
