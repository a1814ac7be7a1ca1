"""One spelling per concept across every command: the canonical flags, the old spellings as aliases that
print one notice and do the same, one list syntax, one device rule, one precision knob."""
from __future__ import annotations

import argparse

import pytest
import torch
from entry_points import commands, parser_for, subparsers

import utils.cli
from utils.cli import ListAction

# Written out here, not read from utils.cli: the old spelling -> the one spelling that replaces it.
DEPRECATED = {
    "--pretrained_encoder": "--feat_ext", "--encoder": "--feat_ext",
    "--checkpoint": "--test_model", "--checkpoints": "--test_model",
    "--out": "--save_path",
    "--device": "--use_GPU",
    "--amp": "--precision", "--recommended": "--precision",
    "--channels_last": "--memory_format",
    "--names": "--models", "--backbones": "--models",
}
# Each alias, typed the old way and the new way: both must give the same namespace.
ALIAS_CASES = [
    (["--pretrained_encoder", "E.pth"], ["--feat_ext", "E.pth"]),
    (["--encoder", "E.pth"], ["--feat_ext", "E.pth"]),
    (["--checkpoint", "M.pth"], ["--test_model", "M.pth"]),
    (["--checkpoints", "A.pth", "B.pth"], ["--test_model", "A.pth", "B.pth"]),
    (["--out", "o.onnx"], ["--save_path", "o.onnx"]),
    (["--device", "cuda:1"], ["--use_GPU", "--gpu_id", "1"]),
    (["--device", "cuda"], ["--use_GPU"]),
    (["--device", "cpu"], []),
    (["--amp", "bf16"], ["--precision", "bf16", "--memory_format", "contiguous"]),
    (["--amp", "off"], ["--precision", "fp32", "--memory_format", "contiguous"]),
    (["--amp", "fp16", "--channels_last"], ["--precision", "fp16", "--memory_format", "channels_last"]),
    (["--channels_last", "--amp", "bf16"], ["--precision", "bf16", "--memory_format", "channels_last"]),
    (["--channels_last"], ["--memory_format", "channels_last"]),
    (["--names", "BRN,IDT"], ["--models", "BRN", "IDT"]),
    (["--backbones", "BRN", "IDT"], ["--models", "BRN,IDT"]),
]
# List-like options that take a fixed count or items that may hold commas themselves.
NOT_LISTS = {
    "--size": "export.py's H W: two numbers",
    "--hparams": "MODEL.name=value items, whose value may be a list with commas (DRSformer.num_blocks=[1,1,1,1])",
}
COMMANDS = commands()


def _parsers():
    for command in COMMANDS:
        for parser in subparsers(parser_for(command)):
            yield command, parser


def _aliases(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help == argparse.SUPPRESS and a.dest == argparse.SUPPRESS
            and a.option_strings]


def _required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """The fewest flags the parser accepts: each required option with a placeholder value."""
    argv = []
    for a in parser._actions:
        if a.option_strings and (a.required or getattr(a, "required_with_alias", False)):
            argv += [a.option_strings[0], "X"]
    return argv


def test_every_command_is_found():
    assert {"test_model", "export", "reproduce", "datasets", "train_BRN", "analysis.rain_detail",
            "benchmarks.benchmark", "utils.metrics"} <= set(COMMANDS)


def test_the_table_in_utils_cli_is_the_one_tested_here():
    table = {old: new for new, olds in utils.cli.CANONICAL.values() for old in olds}
    assert table == DEPRECATED


@pytest.mark.parametrize("command", COMMANDS)
def test_no_parser_spells_a_concept_the_old_way(command):
    for parser in subparsers(parser_for(command)):
        aliases = _aliases(parser)
        for action in parser._actions:
            if action in aliases:
                continue
            old = [s for s in action.option_strings if s in DEPRECATED]
            assert not old, f"{command}: {old[0]} is the old spelling of {DEPRECATED[old[0]]}"
        for alias in aliases:
            (old,) = alias.option_strings
            assert old in DEPRECATED, f"{command}: alias {old} is not in the table"
            assert DEPRECATED[old] in parser._option_string_actions, f"{command}: {old} without {DEPRECATED[old]}"


@pytest.mark.parametrize("command", COMMANDS)
def test_device_flags_come_together_and_default_to_the_cpu(command, monkeypatch):
    from utils.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is there: still the CPU without --use_GPU
    for parser in subparsers(parser_for(command)):
        flags = set(parser._option_string_actions)
        assert ("--use_GPU" in flags) == ("--gpu_id" in flags), command
        if "--use_GPU" in flags:
            args = parser.parse_args(_required_argv(parser))
            assert args.use_GPU is False
            assert resolve_device(args) == torch.device("cpu")
            args = parser.parse_args(_required_argv(parser) + ["--use_GPU", "--gpu_id", "1"])
            assert resolve_device(args) == torch.device("cuda:1")


@pytest.mark.parametrize("command", COMMANDS)
def test_precision_is_one_knob(command):
    for parser in subparsers(parser_for(command)):
        action = parser._option_string_actions.get("--precision")
        if action is None or action.help == argparse.SUPPRESS:
            continue
        assert set(action.choices) == {"auto", "fp32", "bf16", "fp16"}, command
        if "--memory_format" in parser._option_string_actions:
            assert set(parser._option_string_actions["--memory_format"].choices) == {"auto", "contiguous",
                                                                                     "channels_last"}


def _alias_cases():
    for command in COMMANDS:
        for parser in subparsers(parser_for(command)):
            present = {a.option_strings[0] for a in _aliases(parser)}
            for old, new in ALIAS_CASES:
                if {f for f in old if f.startswith("--")} <= present | set(parser._option_string_actions):
                    if old[0] in present:
                        yield pytest.param(command, old, new, id=f"{command}:{' '.join(old)}")


def test_every_alias_has_a_case():
    cased = {old[0] for old, _ in ALIAS_CASES} | {"--recommended"}
    for command, parser in _parsers():
        for alias in _aliases(parser):
            assert alias.option_strings[0] in cased, f"{command}: no case for {alias.option_strings[0]}"


@pytest.mark.parametrize("command,old,new", list(_alias_cases()))
def test_an_alias_does_what_its_new_spelling_does_and_says_so_once(command, old, new, capsys):
    parser = parser_for(command)
    base = _required_argv(parser)
    expected = parser.parse_args(base + new)
    assert capsys.readouterr().err == ""
    got = parser.parse_args(base + old)
    err = capsys.readouterr().err
    assert vars(got) == vars(expected)
    notes = [line for line in err.splitlines() if line]
    aliases_typed = [f for f in old if f in DEPRECATED]
    assert len(notes) == len(aliases_typed), err
    for flag, note in zip(aliases_typed, notes):
        assert note.startswith(f"note: {flag} is deprecated; use {DEPRECATED[flag]}"), note


def test_recommended_keeps_the_machine_setting(capsys):
    from utils.eval.precision import Setting, setting_from_flags

    args = parser_for("test_model").parse_args(["--recommended"])
    assert args.precision == "recommended"
    assert capsys.readouterr().err.count("\n") == 1
    # The marker resolves to recommended_setting: on CUDA that is bf16 + channels-last.
    cpu = torch.device("cpu")
    assert setting_from_flags("fp32", "auto", cpu) == Setting(None, False, "--precision fp32")
    assert (setting_from_flags("bf16", "auto", cpu).amp, setting_from_flags("bf16", "auto", cpu).channels_last) == (
        "bf16", True)
    assert setting_from_flags("bf16", "contiguous", cpu).channels_last is False
    assert setting_from_flags("fp16", "auto", cpu).amp == "fp16"
    assert setting_from_flags("fp32", "channels_last", cpu).channels_last is True


def test_a_required_flag_may_be_given_by_its_alias(capsys):
    parser = parser_for("export")
    assert parser.parse_args(["--test_model", "m.pth", "--out", "m.onnx"]).save_path == "m.onnx"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--test_model", "m.pth"])
    assert exc.value.code == 2
    assert "required: --save_path" in capsys.readouterr().err


def _list_options():
    for command, parser in _parsers():
        for action in parser._actions:
            if action.nargs in ("+", "*", argparse.REMAINDER) or isinstance(action, ListAction):
                if action.help == argparse.SUPPRESS or set(action.option_strings) & set(NOT_LISTS):
                    continue
                yield command, parser, action


def test_every_list_flag_takes_spaces_and_commas():
    checked = 0
    for command, parser, action in _list_options():
        name = action.option_strings[0] if action.option_strings else action.dest
        assert isinstance(action, ListAction), f"{command} {name}: use utils.cli.add_list"
        if not action.option_strings:
            continue
        choices = list(action.item_choices or [])
        numeric = action.item_type in (int, float)
        texts = ([str(c) for c in choices] * 3)[:3] if choices else (["1", "2", "3"] if numeric else ["a", "b", "c"])
        base = _required_argv(parser)
        spaced = parser.parse_args(base + [name, *texts])
        commas = parser.parse_args(base + [name, ",".join(texts[:2]), texts[2]])
        expected = [action.item_type(t) for t in texts] if numeric else texts
        assert getattr(spaced, action.dest) == expected, (command, name)
        assert getattr(commas, action.dest) == expected, (command, name)
        checked += 1
    assert checked >= 15  # --test_dir, --testset, --metrics, --data_paths (train and analysis), --models, ...


def test_list_items_are_checked_after_splitting(capsys):
    parser = parser_for("benchmarks.benchmark")
    assert parser.parse_args(["--settings", "fp32,recommended"]).settings == ["fp32", "recommended"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--settings", "fp32,fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser_for("benchmarks.training_cost").parse_args(["--tflops", "25,lots"])
    assert "invalid float value: 'lots'" in capsys.readouterr().err


def test_a_quoted_path_with_a_space_stays_one_path():
    args = parser_for("test_model").parse_args(["--test_dir", "my photos/a.jpg,b.jpg"])
    assert args.test_dir == ["my photos/a.jpg", "b.jpg"]


def test_training_keeps_the_comma_separated_data_paths():
    from utils.train.config import parse_train_args

    config = parse_train_args("BRN", ["--data_paths", "a,b", "c", "--precision", "bf16"])
    assert config.data_paths == "a,b,c"
    assert (config.amp, config.channels_last) == ("bf16", False)
    config = parse_train_args("BRN", ["--precision", "fp16", "--memory_format", "channels_last"])
    assert (config.amp, config.channels_last) == ("fp16", True)


@pytest.mark.parametrize("command,sections", [("test_model", ["input", "model", "output", "speed", "device"]),
                                               ("export", ["input", "model", "output", "speed"])])
def test_help_is_grouped_into_sections(command, sections):
    parser = parser_for(command)
    groups = {g.title: g for g in parser._action_groups}
    assert [t for t in groups if t in sections] == sections
    ungrouped = [a for g in parser._action_groups if g.title not in sections for a in g._group_actions
                 if a.help != argparse.SUPPRESS]
    assert [a.dest for a in ungrouped] == ["help"]
    text = parser.format_help()
    assert [t for t in sections if f"\n{t}:\n" in text] == sections


def test_max_memory_help_says_the_fewest_pixels():
    text = " ".join(parser_for("test_model").format_help().split())
    assert "fewest pixels" in text and "largest tiles" not in text
