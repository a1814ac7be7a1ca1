"""Every ``python ...`` command in README.md and docs/*.md parses with its own script's parser (nothing runs).

Commands are taken from ```bash blocks (with their backslash-continued lines) and from inline code
spans; ``python -m pkg.mod`` and ``torchrun ... script.py`` forms are included, GPU-only ones too.
Placeholders such as ``MODEL.pth`` are ordinary values to a parser.
"""
from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
from entry_points import commands, module_name, parse_command, parser_for
from helpers import ROOT

FENCE = re.compile(r"^```([\w-]*)\s*$")
INLINE = re.compile(r"`((?:python3?|torchrun) [^`]+)`")
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}
# Programs of others that the docs run with python, and the development tools under tools/ (not user
# commands): not parsed here.
EXTERNAL = {"pytest", "pip", "venv", "torch.utils.collect_env", "onnxruntime", "tensorboard", "tools"}


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every shell line in fenced blocks, continuation lines joined, and of
    every inline code span that starts with python or torchrun."""
    found: list[tuple[int, str]] = []
    fence, pending, start = None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if m:
            fence = None if fence is not None else m.group(1)
            pending = ""
            continue
        if fence is None:
            found += [(number, code) for code in INLINE.findall(line)]
            continue
        if fence not in SHELL_BLOCKS:
            continue
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        found.append((start, (pending + stripped).strip()))
        pending = ""
    return found


def python_commands(line: str) -> list[list[str]]:
    """The ``[target, *args]`` of each python/torchrun command of a shell line (``a && b`` gives two).
    target: a script path as written, or ``-m module``'s module."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, part = [], []
    for token in tokens + [";"]:
        if token in ("&&", "||", ";", "|"):
            found.append(part)
            part = []
        else:
            part.append(token)
    out = []
    for part in found:
        while part and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", part[0]):  # VAR=value prefixes
            part = part[1:]
        for i, token in enumerate(part):
            if token in ("python", "python3"):
                rest = part[i + 1:]
                if rest[:1] == ["-m"] and len(rest) > 1:
                    out.append([rest[1], *rest[2:]])
                elif rest and rest[0].endswith(".py"):
                    out.append(rest)
                break
            if token == "torchrun":
                script = next((j for j, t in enumerate(part) if t.endswith(".py")), None)
                if script is not None:
                    out.append(part[script:])
                break
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in doc_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for number, line in shell_lines(text):
            for argv in python_commands(line):
                found.append((f"{os.path.relpath(path, ROOT)}:{number}", argv))
    return found


DOC_COMMANDS = doc_commands()
OURS = set(commands())


def test_the_extractor_reads_blocks_continuations_inline_code_and_modules():
    text = "\n".join([
        "Run `python test_model.py --list_models` first.",
        "```bash",
        "# a comment",
        "python train_BRN.py --use_GPU \\",
        "    --gpu_id 0   # trailing comment",
        "COIC_X=1 python -m analysis.model_cost --models BRN,IDT && python -m pytest tests -q",
        "torchrun --nproc_per_node 4 train_IDT.py --use_GPU",
        "```",
        "```python",
        "python export.py --not_a_shell_block",
        "```",
    ])
    got = [argv for _, line in shell_lines(text) for argv in python_commands(line)]
    assert got == [["test_model.py", "--list_models"], ["train_BRN.py", "--use_GPU", "--gpu_id", "0"],
                   ["analysis.model_cost", "--models", "BRN,IDT"], ["pytest", "tests", "-q"],
                   ["train_IDT.py", "--use_GPU"]]


def test_the_docs_have_commands_to_check():
    ours = [argv for _, argv in DOC_COMMANDS if module_name(argv[0]) in OURS]
    assert len(ours) >= 25
    assert {"test_model", "reproduce", "export"} <= {module_name(argv[0]) for argv in ours}


@pytest.mark.parametrize("where,argv", DOC_COMMANDS, ids=[f"{w}:{a[0]}" for w, a in DOC_COMMANDS])
def test_a_doc_command_parses_with_its_scripts_parser(where, argv, capsys):
    name = module_name(argv[0])
    if "<" in name:
        pytest.skip(f"{argv[0]}: a pattern (python -m analysis.<tool>), not one command")
    if name not in OURS:
        top = name.split(".")[0]
        ours_like = os.path.exists(os.path.join(ROOT, top)) or os.path.exists(os.path.join(ROOT, top + ".py"))
        assert top in EXTERNAL or not ours_like, f"{where}: {argv[0]} is not a command of this repository"
        pytest.skip(f"{argv[0]} is not a command of this repository")
    try:
        parse_command(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: {' '.join(argv)}\n{capsys.readouterr().err}"
    err = capsys.readouterr().err
    assert "deprecated" not in err, f"{where}: the docs use an old spelling: {err}"


PAPER_SETS = {"Rain200L", "Rain200H", "Rain800", "DID", "DDN", "SPA"}


def test_the_paper_table_commands_use_the_paper_protocol():
    """A command that evaluates the paper's synthetic sets together (its table) scores them as the
    paper did: the coic protocol, for every set (utils/paper/experiments.py: PAPER_PROTOCOL)."""
    checked = 0
    for where, argv in DOC_COMMANDS:
        if module_name(argv[0]) != "test_model":
            continue
        args = parser_for("test_model").parse_args(argv[1:])
        if args.testset and len(PAPER_SETS & set(args.testset)) > 1:
            assert args.metric_protocol == "coic", f"{where}: {' '.join(argv)}"
            checked += 1
    assert checked >= 1
