"""Mutation testing of the core modules with mutmut, under a time bound (a development command, not CI).

    pip install -r requirements-dev.txt
    nice -n 19 python tools/mutate.py                         # every core module in setup.cfg [mutmut]
    nice -n 19 python tools/mutate.py utils/tiling.py --sample 40 --time_limit 600

mutmut (settings in setup.cfg) copies the tree to mutants/, makes one small change at a time in
the modules under ``only_mutate`` and runs the tests of ``pytest_add_cli_args_test_selection`` that
reach the changed function. This script picks which mutants run: it leaves out those that only
change the text of a string literal (mostly messages and labels; ``--all_kinds`` keeps them), takes
a seeded sample per module if asked, skips mutants that already have a verdict (``--rerun`` to run
them again) and stops mutmut after ``--time_limit`` seconds. It ends with killed / total per module
and the surviving mutants; ``mutmut show NAME`` prints one's change.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
import tokenize
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check"}
TESTED = KILLED | {"survived"}


def _mutmut():
    """mutmut's internals this script reads (pinned in requirements-dev.txt: they are not a public API)."""
    try:
        from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths,
                                     store_lines_covered_by_tests)
        from mutmut.configuration import config
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.mutation.trampoline import set_mutant_under_test
        from mutmut.stats import status_by_exit_code
        from mutmut.utils.file_utils import walk_mutatable_files
    except ImportError as exc:
        raise SystemExit(f"error: mutmut 3.8 is not installed ({exc}); run: pip install -r requirements-dev.txt")
    return dict(config=config, SourceFileMutationData=SourceFileMutationData, get_diff=get_diff_for_mutant,
                status=status_by_exit_code, walk=walk_mutatable_files, set_under_test=set_mutant_under_test,
                copy_src_dir=copy_src_dir, copy_also=copy_also_copy_files, setup_paths=setup_source_paths,
                store_lines=store_lines_covered_by_tests, create=create_mutants)


def generate(mm) -> None:
    """Write mutants/ (mutmut's copy of the tree with every mutant), as ``mutmut run`` does first."""
    mm["set_under_test"]("mutant_generation")
    os.makedirs("mutants", exist_ok=True)
    mm["copy_src_dir"]()
    mm["copy_also"]()
    mm["setup_paths"]()
    mm["store_lines"]()
    mm["create"](os.cpu_count() or 2)
    mm["set_under_test"]("")


def _code_tokens(line: str) -> list[str]:
    """The tokens of one line of source, every string literal replaced by one placeholder."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):  # a continuation line: blank its literals
        return [re.sub(r"""(?:[rbfRBF]{0,2})("[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*')""", "<str>",
                       line.strip())]
    return ["<str>" if t.type == tokenize.STRING else t.string for t in tokens
            if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT)]


def only_changes_text(diff: str) -> bool:
    """Whether a mutant's diff changes nothing but the contents of string literals."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return len(removed) == len(added) and all(_code_tokens(a) == _code_tokens(b) for a, b in zip(removed, added))


def mutants_by_module(mm, wanted: list[str]) -> dict[str, dict[str, str]]:
    """{source path: {mutant name: status}} of the mutated modules (those in ``wanted``, when given)."""
    out = {}
    for path in mm["walk"]():
        if wanted and str(path) not in wanted:
            continue
        data = mm["SourceFileMutationData"](path=path)
        data.load()
        out[str(path)] = {k: mm["status"][v] for k, v in data.exit_code_by_key.items()}
    return out


def run_mutmut(names: list[str], time_limit: float) -> None:
    """``mutmut run NAMES`` (in batches: a command line has a length limit), stopped after ``time_limit`` s."""
    deadline = time.monotonic() + time_limit
    for start in range(0, len(names), 400):
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"time limit ({time_limit:.0f} s) reached; the rest stays 'not checked'")
            return
        proc = subprocess.Popen(["mutmut", "run", *names[start:start + 400]], start_new_session=True)
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            print(f"time limit ({time_limit:.0f} s) reached; the rest stays 'not checked'")
            return


def report(results: dict[str, dict[str, str]], selected: dict[str, list[str]]) -> None:
    """killed / tested per module over the selected mutants, then the survivors."""
    print(f"\n{'module':32s} {'killed':>6s} / {'tested':<6s} {'score':>6s}  not checked")
    survivors = []
    total = Counter()
    for path, names in selected.items():
        counts = Counter(results[path][n] for n in names)
        tested = sum(counts[s] for s in TESTED)
        killed = sum(counts[s] for s in KILLED)
        total["killed"] += killed
        total["tested"] += tested
        score = f"{100 * killed / tested:5.1f}%" if tested else "   -"
        print(f"{path:32s} {killed:6d} / {tested:<6d} {score:>6s}  {len(names) - tested - counts['no tests']}"
              + (f" (+{counts['no tests']} reached by no test)" if counts["no tests"] else ""))
        survivors += [n for n in names if results[path][n] == "survived"]
    if total["tested"]:
        print(f"{'all':32s} {total['killed']:6d} / {total['tested']:<6d} {100 * total['killed'] / total['tested']:5.1f}%")
    if survivors:
        print("\nsurvived (mutmut show NAME):")
        print("\n".join(f"  {n}" for n in sorted(survivors)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="source paths to mutate (default: setup.cfg's only_mutate)")
    parser.add_argument("--sample", type=int, default=0, help="mutants per module, drawn with --seed (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time_limit", type=float, default=3600, help="seconds mutmut may run (default 3600)")
    parser.add_argument("--rerun", action="store_true", help="run mutants that already have a verdict again")
    parser.add_argument("--report", action="store_true", help="print the verdicts so far, run nothing")
    parser.add_argument("--all_kinds", action="store_true", help="keep the mutants that only change a string's text")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    mm = _mutmut()
    wanted = [str(Path(m)) for m in args.modules]
    unknown = [m for m in wanted if m not in mm["config"]().only_mutate]
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)} not in setup.cfg [mutmut] only_mutate "
                         f"({', '.join(mm['config']().only_mutate)})")
    generate(mm)
    results = mutants_by_module(mm, wanted)
    selected = {}
    for path, statuses in results.items():
        names = [n for n in statuses if args.all_kinds or not only_changes_text(mm["get_diff"](n, path=path))]
        if args.sample and len(names) > args.sample:
            names = sorted(random.Random(f"{args.seed}:{path}").sample(names, args.sample))
        selected[path] = names
    if not args.report:
        todo = [n for path, names in selected.items() for n in names
                if args.rerun or results[path][n] in ("not checked", "no tests")]
        print(f"{len(todo)} mutants to run ({sum(map(len, selected.values()))} selected, string-text mutants left out)")
        if todo:
            run_mutmut(todo, args.time_limit)
        results = mutants_by_module(mm, wanted)
    report(results, selected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
