"""``python datasets.py demo|pairs|prepare|check``: the dataset tools' command line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from utils.cli import Parser, add_list
from utils.errors import cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Dataset tools: demo data, pair counts, prepare raw sets, check a data root.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="write the synthetic mixed-rain demo data")
    demo.add_argument("root", nargs="?", default="demo_data")
    count = sub.add_parser("pairs", help="count the rain/clean pairs of folders")
    add_list(count, "folders", metavar="FOLDER", help="folders with rain/ and norain/, space- or comma-separated")
    prep = sub.add_parser("prepare",
                          help="split stacked Rain800/DID images into rain/ + norain/ (DID: merge densities)")
    prep.add_argument("dataset", choices=["rain800", "did"])
    prep.add_argument("raw", help="folder of side-by-side images (DID: or the folder holding Rain_Heavy/Medium/Light)")
    prep.add_argument("out", help="output folder; receives rain/, norain/ and sources.csv")
    prep.add_argument("--overwrite", action="store_true", help="replace existing outputs that differ")
    chk = sub.add_parser("check", help="check every dataset under a data root: pairs, counts, unreadable images")
    chk.add_argument("root", nargs="?", default="datasets")
    chk.add_argument("--ignore_counts", action="store_true",
                     help="do not fail when counts differ from the official ones")
    chk.add_argument("--fast", action="store_true", help="read image headers only (misses truncated files)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """One sub-command; 0 when all is well, 1 when ``check`` found problems."""
    if args.cmd == "demo":
        from utils.data.demo import build_demo_data

        build_demo_data(args.root)
    elif args.cmd == "pairs":
        from utils.data.layouts import find_pairs

        for folder in args.folders:
            print(f"{folder}: {len(find_pairs(folder))} pairs")
    elif args.cmd == "prepare":
        from utils.data.prepare import prepare

        counts = prepare(args.dataset, args.raw, args.out, overwrite=args.overwrite)
        print(f"prepare {args.dataset}: {counts['written']} written, {counts['unchanged']} unchanged, "
              f"{counts['overwritten']} overwritten -> {args.out}")
    else:
        from utils.data.check import check_root, format_check
        from utils.data.specs import DATASET_SPECS

        results = check_root(args.root, full=not args.fast)
        print(format_check(results, args.ignore_counts))
        present = [r for r in results if not r.absent]
        if not present:
            print(f"error: {args.root} holds none of {', '.join(s.name for s in DATASET_SPECS)}", file=sys.stderr)
            return 1
        return 1 if any(r.problems(args.ignore_counts) for r in present) else 0
    return 0
