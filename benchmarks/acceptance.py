"""GPU acceptance in one command: the CUDA-marked tests, then the benchmark against the published code.

    python -m benchmarks.acceptance --published ../CoIC-published        # on a CUDA machine (<= 8 min, 1 GPU)
    python -m benchmarks.acceptance --dry_run                            # the same sequence, tiny, on the CPU

1. ``pytest -m cuda tests/test_cuda.py`` (every backbone's training step in both stages in fp32,
   bf16 + channels-last and fp16 with the scaler; the fused-optimizer skip; no host sync inside
   a step; ``--compile`` on BRN; NCCL);
2. ``benchmarks.benchmark`` at each recipe's reference batch/crop: stage-1 and CoIC-stage img/s,
   peak memory, 512x512 inference ms in both modes, fp32 and the recommended setting, the
   published code side by side (``--published``);
3. ``acceptance.json`` and ``acceptance.md`` in ``--save_path``: device, driver, CUDA, torch,
   date, the test outcome and the benchmark table with the targets (CoIC-stage training >= 2x
   the published img/s in the recommended setting and fp32 not slower, inference >= 1.5x, peak
   memory not above the published code's).

``--dry_run`` runs the same three steps on the CPU at tiny sizes (the test file with
``COIC_TEST_DEVICE=cpu``, the benchmark's ``--tiny`` models at 32x32): the test suite runs it, so
the GPU path cannot rot unseen. Exit status 0 when the tests pass and every case was measured.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from utils.cli import HelpFormatter, add_list
from utils.tables import markdown_table

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIME_LIMIT_S = 8 * 60
TARGETS = {"coic_speedup_recommended": 2.0, "coic_speedup_fp32": 1.0, "infer_speedup": 1.5}


class AcceptanceError(Exception):
    """A user-facing error: one line, exit status 2."""


def environment(device_type: str) -> dict:
    """Device, driver, CUDA, cuDNN, torch, Python and the date, for the report's header."""
    import torch

    from utils.eval.precision import cpu_model_name

    env = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": cpu_model_name(), "device_type": device_type}
    if device_type == "cuda":
        env.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    else:
        env.update(device=env["cpu"], gpus=0, cuda=None, cudnn=None, driver=None)
    return env


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_tests(device_type: str, timeout: float) -> dict:
    """The CUDA-marked tests on ``device_type``: counts, failed test ids and the output's tail."""
    import xml.etree.ElementTree as ET

    env = dict(os.environ, COIC_TEST_DEVICE=device_type)
    with tempfile.TemporaryDirectory(prefix="coic_accept_tests_") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        # -n 0: in one process, whatever pyproject.toml's addopts say (the tests share one GPU)
        cmd = [sys.executable, "-m", "pytest", "-n", "0", "-m", "cuda", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={junit}", os.path.join("tests", "test_cuda.py")]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            output, code = f"timed out after {timeout:.0f} s (--test_timeout)", -1
        counts, failed = {}, []
        if os.path.isfile(junit):
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            total, bad = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            counts = {"passed": total - bad - skipped, "failed": bad, "skipped": skipped}
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"returncode": code, "seconds": round(time.monotonic() - start, 1), "counts": counts, "failed": failed,
            "tail": "\n".join(output.strip().splitlines()[-15:])}


def benchmark_argv(args: argparse.Namespace, save_path: str, data_dir: Optional[str]) -> list[str]:
    argv = ["--save_path", save_path]
    if args.dry_run:
        argv += ["--tiny", "--iters", "1", "--warmup", "0", "--infer_size", "32", "--threads", "1"]
    else:
        argv += ["--iters", str(args.iters), "--warmup", str(args.warmup), "--infer_size", "512", "--case_timeout", "150",
                 "--use_GPU"]
    if args.published:
        argv += ["--published", args.published]
    if data_dir:
        argv += ["--data_dir", data_dir]
    if args.models:
        argv += ["--models"] + list(args.models)
    return argv


def run_benchmark(args: argparse.Namespace, data_dir: Optional[str]) -> dict:
    """``benchmarks.benchmark`` into a temporary folder; its rows (numbers as floats) and header."""
    from benchmarks import benchmark

    with tempfile.TemporaryDirectory(prefix="coic_accept_") as tmp:
        start = time.monotonic()
        code = benchmark.main(benchmark_argv(args, tmp, data_dir))
        path = os.path.join(tmp, "benchmark.csv")
        if not os.path.isfile(path):
            return {"returncode": code, "rows": [], "header": "", "seconds": round(time.monotonic() - start, 1)}
        with open(path, newline="") as f:
            header = f.readline().lstrip("# ").strip()
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {"returncode": code, "rows": rows, "header": header, "seconds": round(time.monotonic() - start, 1)}


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value if value != "" else None


def check_targets(rows: list[dict]) -> list[dict]:
    """Per backbone: the GPU targets against the published code, met (True/False) or not measured (None)."""
    out = []
    for name in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == name]
        fp32 = next((r for r in mine if str(r["setting"]).startswith("fp32")), None)
        rec = next((r for r in mine if str(r["setting"]).startswith("recommended")), None) or fp32

        def ratio(row, ours, theirs):
            if row is None or row.get(ours) is None or not row.get(theirs):
                return None
            return row[ours] / row[theirs]

        coic_rec, coic_fp32 = rec and rec.get("speedup_coic"), fp32 and fp32.get("speedup_coic")
        infer = [ratio(rec, f"published_infer_{m}_ms", f"ours_infer_{m}_ms") for m in ("normal", "coic")]
        peak = ratio(rec, "ours_peak_mib", "published_peak_mib")

        def met(value, target, above=True):
            return None if value is None else (value >= target if above else value <= target)

        out.append({"backbone": name, "coic_speedup_recommended": coic_rec, "coic_speedup_fp32": coic_fp32,
                    "infer_speedup_normal": infer[0], "infer_speedup_coic": infer[1], "peak_ratio": peak,
                    "met": {"coic_recommended": met(coic_rec, TARGETS["coic_speedup_recommended"]),
                            "coic_fp32": met(coic_fp32, TARGETS["coic_speedup_fp32"]),
                            "inference": met(min(infer) if None not in infer else None, TARGETS["infer_speedup"]),
                            "peak": met(peak, 1.0, above=False)}})
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(report: dict) -> str:
    env, tests, bench = report["environment"], report["tests"], report["benchmark"]
    title = "# GPU acceptance" + (" (dry run on the CPU, tiny sizes)" if report["dry_run"] else "")
    lines = [title, "", f"- date: {env['date']}", f"- device: {env['device']} ({env['device_type']}, "
             f"{env['gpus']} GPU(s)); driver {env['driver'] or '—'}, CUDA {env['cuda'] or '—'}, "
             f"cuDNN {env['cudnn'] or '—'}", f"- torch {env['torch']}, Python {env['python']}, host CPU {env['cpu']}",
             f"- total {report['seconds']:.0f} s (limit {TIME_LIMIT_S} s)", "",
             "## CUDA-marked tests", "", "`tests/test_cuda.py`: " + (", ".join(f"{n} {k}" for k, n in
             tests["counts"].items()) or "no result") + f" in {tests['seconds']:.0f} s (exit status "
             f"{tests['returncode']})", ""]
    if tests["failed"] or tests["returncode"] != 0:
        lines += ["Failed:", ""] + [f"- `{t}`" for t in tests["failed"]] + ["", "```", tests["tail"], "```", ""]
    lines += ["## Benchmark against the published code", "", bench.get("header", ""), ""]
    if bench["rows"]:
        from benchmarks import benchmark

        lines.append(benchmark.markdown_table(bench["rows"]))
    lines += ["", "## Targets", "", f"CoIC-stage training >= {TARGETS['coic_speedup_recommended']}x the published "
              f"img/s (recommended setting), fp32 not slower, inference >= {TARGETS['infer_speedup']}x (both modes), "
              "peak memory <= the published code's.", "",
              *markdown_table(["backbone", "CoIC speed-up, recommended", "met", "CoIC speed-up, fp32", "met",
                               "inference speed-up plain / CoIC", "met", "peak ours / published", "met"],
                              [[t["backbone"], _fmt(t["coic_speedup_recommended"]), _fmt(t["met"]["coic_recommended"]),
                                _fmt(t["coic_speedup_fp32"]), _fmt(t["met"]["coic_fp32"]),
                                f"{_fmt(t['infer_speedup_normal'])} / {_fmt(t['infer_speedup_coic'])}",
                                _fmt(t["met"]["inference"]), _fmt(t["peak_ratio"]), _fmt(t["met"]["peak"])]
                               for t in report["targets"]])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GPU acceptance: CUDA-marked tests, then the benchmark against the "
                                "published code; JSON + Markdown report.",
                                formatter_class=HelpFormatter)
    p.add_argument("--published", default=None, metavar="DIR", help="checkout of github Schizophreni/CoIC")
    p.add_argument("--dry_run", action="store_true", help="the same sequence at tiny sizes on the CPU")
    p.add_argument("--save_path", default=os.path.join("benchmarks", "results"),
                   help="folder for acceptance.json and acceptance.md")
    add_list(p, "--models", default=None, metavar="NAME",
             help="backbones to benchmark, space- or comma-separated (default: every one)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per case (GPU run)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per case (GPU run)")
    p.add_argument("--test_timeout", type=float, default=240, help="seconds for the CUDA-marked tests")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.errors import cli_main

    return cli_main(lambda: run(args), also=(AcceptanceError,))


def run(args: argparse.Namespace) -> int:
    import torch

    from utils.io import atomic_write_text

    if not args.dry_run and not torch.cuda.is_available():
        raise AcceptanceError("no CUDA device here: run it on a GPU machine, or pass --dry_run to check the "
                              "sequence on the CPU")
    if args.published is not None and not os.path.isdir(os.path.join(args.published, "models")):
        raise AcceptanceError(f"--published {args.published} is not a checkout of Schizophreni/CoIC (no models/)")
    device_type = "cpu" if args.dry_run else "cuda"
    start = time.monotonic()
    print(f"1/2 CUDA-marked tests on {device_type} ...", flush=True)
    tests = run_tests(device_type, args.test_timeout)
    print(f"    {tests['counts']} in {tests['seconds']:.0f} s", flush=True)
    print("2/2 benchmark ...", flush=True)
    tmp = tempfile.mkdtemp(prefix="coic_accept_data_")
    try:
        from utils.data.demo import build_demo_data

        data = build_demo_data(os.path.join(tmp, "demo"), train_per_source=1, train_size=32, test_size=32)
        bench = run_benchmark(args, os.path.join(data, "light", "train"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"dry_run": args.dry_run, "environment": environment(device_type), "tests": tests,
              "benchmark": bench, "targets": check_targets(bench["rows"]), "seconds": time.monotonic() - start}
    atomic_write_text(os.path.join(args.save_path, "acceptance.json"), json.dumps(report, indent=1, default=str))
    text = markdown(report)
    atomic_write_text(os.path.join(args.save_path, "acceptance.md"), text)
    print(text)
    if report["seconds"] > TIME_LIMIT_S and not args.dry_run:
        print(f"warning: took {report['seconds']:.0f} s, above the {TIME_LIMIT_S} s budget", file=sys.stderr)
    ok = tests["returncode"] == 0 and bench["returncode"] == 0 and bool(bench["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
