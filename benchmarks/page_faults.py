"""Kernel time and page faults of BRN on the CPU, with and without ``utils.allocator.keep_freed_memory``.

    python -m benchmarks.page_faults                            # 512x512, 2 forwards, plain and CoIC
    python -m benchmarks.page_faults --size 256 --forwards 1 --threads 1
    python -m benchmarks.page_faults --cases train --forwards 1 --warmup 0   # the training step

Reference BRN (``build_model("BRN")``) under ``torch.inference_mode``, plain (z=None) and CoIC
(a random unit z of the model's ``dim_in``), each case in a fresh process: a heap grown by an
earlier case would hide the faults. After ``--warmup`` untimed forwards, ``--forwards`` timed ones
give wall, user and system seconds per forward (``getrusage``), the kernel's share of the CPU
time, and minor page faults per forward; peak RSS is the process's high-water mark.

``--cases train`` measures the training step of ``benchmarks.benchmark`` (``benchmarks.timing.measure_ours``:
the real ``Trainer.train_step`` at the recipe's batch and crop, stage 1 then CoIC, and two small
restorations); its row covers that whole window, per training step.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks.timing import run_worker, worker_main  # noqa: E402
from utils.cli import add_list  # noqa: E402
from utils.tables import markdown_table  # noqa: E402

MODEL = "BRN"
HEADERS = ["case", "allocator", "wall s", "user s", "system s", "system share", "minor faults",
           "peak RSS MiB", "RSS growth MiB"]


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _per_call(before: tuple, after: tuple, calls: int) -> dict:
    wall, user, system, faults = ((b - a) / calls for a, b in zip(before, after))
    return {"wall": wall, "user": user, "system": system, "faults": faults}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_forwards(params: dict) -> dict:
    """Worker: ``params["forwards"]`` timed forwards of reference BRN after ``params["warmup"]``."""
    from models import build_model
    from utils.train.config import parse_train_args

    dim_in = parse_train_args(MODEL, []).model_hparams["dim_in"]
    model = build_model(MODEL).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, params["size"], params["size"], generator=gen)
    z = None
    if params["case"] == "coic":
        z = torch.nn.functional.normalize(torch.randn(1, dim_in, generator=gen), dim=1)
    with torch.inference_mode():
        for _ in range(params["warmup"]):
            model(x, z)
        peak_before = _peak_rss_mib()
        before = _usage()
        for _ in range(params["forwards"]):
            model(x, z)
        result = _per_call(before, _usage(), params["forwards"])
    return {**result, "peak_rss": _peak_rss_mib(), "rss_growth": _peak_rss_mib() - peak_before}


def measure_train_step(params: dict) -> dict:
    """Worker: ``benchmarks.timing.measure_ours`` for BRN's recipe, counted per training step."""
    from benchmarks.benchmark import _demo_folder
    from benchmarks.timing import Case, measure_ours
    from utils.train.config import parse_train_args

    recipe = parse_train_args(MODEL, [])
    tmp = tempfile.mkdtemp(prefix="coic_faults_")
    try:
        case = Case(MODEL, recipe.batch_size, recipe.crop_size, None, False, "cpu", params["threads"],
                    params["warmup"], params["forwards"], 64, 32, os.path.abspath(_demo_folder(tmp)))
        before = _usage()
        ours = measure_ours(case)
        steps = 2 * (case.warmup + case.iters)  # stage 1 and CoIC
        result = _per_call(before, _usage(), steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "peak_rss": _peak_rss_mib(), "rss_growth": None,
            "coic_step_s": recipe.batch_size / ours["coic_img_s"], "batch": case.batch, "crop": case.crop}


def measure(params: dict) -> dict:
    """Body of one worker process: the allocator setting first, before any large tensor exists."""
    if params["keep"]:
        from utils.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(params["threads"])
    return measure_train_step(params) if params["case"] == "train" else measure_forwards(params)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table_row(params: dict, r: dict) -> list[str]:
    if "error" in r:
        return [params["case"], "kept" if params["keep"] else "glibc default", r["error"]] + [""] * 6
    cpu = r["user"] + r["system"]
    case = params["case"] if params["case"] != "train" else f"train step (batch {r['batch']} x {r['crop']})"
    return [case, "kept" if params["keep"] else "glibc default", _fmt(r["wall"]), _fmt(r["user"]),
            _fmt(r["system"]), f"{100 * r['system'] / cpu:.1f} %" if cpu else "-", _fmt(r["faults"], 0),
            _fmt(r["peak_rss"], 0), _fmt(r["rss_growth"], 0)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="square image side of the forwards")
    p.add_argument("--forwards", type=int, default=2, help="timed forwards (training steps per stage) per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards before them")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    add_list(p, "--cases", default=["plain", "coic"], choices=["plain", "coic", "train"],
                   help="forwards without z, with z, and/or training steps at the recipe's batch and crop")
    p.add_argument("--case_timeout", type=float, default=1800, help="seconds before a case is abandoned")
    p.add_argument("--worker_params", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_params:
        return worker_main(args.worker_params, args.worker_out, measure)
    from utils.eval.precision import cpu_model_name

    rows = []
    for case in args.cases:
        for keep in (False, True):
            params = {"case": case, "keep": keep, "size": args.size, "forwards": args.forwards,
                      "warmup": args.warmup, "threads": args.threads}
            rows.append(table_row(params, run_worker("benchmarks.page_faults", params, REPO_ROOT,
                                                     args.case_timeout)))
            print(f"done: {case}, {'kept' if keep else 'glibc default'}", file=sys.stderr)
    print(f"CPU: {cpu_model_name()}, {args.threads} thread{'s' if args.threads != 1 else ''} | torch "
          f"{torch.__version__} | {MODEL} reference, {args.size}x{args.size} (train: batch x crop of its row), per forward "
          f"or step: mean of {args.forwards} after {args.warmup} warm-up")
    print("\n".join(markdown_table(HEADERS, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
