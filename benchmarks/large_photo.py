"""Peak memory and seconds of ``test_model.py`` on one large photo (default 4000x3000), per backbone.

Each backbone, in the reference configuration with CoIC (model + encoder; random weights, since
memory and time do not depend on the values), is saved to a checkpoint and run through an
ordinary ``test_model.py --load_mode tran --max_memory BUDGET ...`` run (the script, in-process) on one
synthetic rainy photo, in a fresh process per backbone, so that the kernel's high-water mark of
resident memory (``VmHWM``) is that run's own peak. The report gives the tile plan
``test_model.py`` chose with its estimate, the measured peak against the budget, and the seconds.

A full 12-megapixel restoration takes from minutes to hours on a small CPU. ``--max_forwards K``
stops each run after K forwards of the backbone: the peak is then that of the image's buffers and
K tiles (every tile has the same size, so later ones peak alike; the blend's division, the scores
and the PNG are not reached), and the seconds are extrapolated as the time to the first forward
+ forwards x their median. Such rows are marked "extrapolated".

    python -m benchmarks.large_photo                                 # every backbone, full runs
    python -m benchmarks.large_photo --max_forwards 2 --max_memory 4G
    python -m benchmarks.large_photo --models DRSformer --threads 2 --max_memory 14G --precision bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from models import available_models  # noqa: E402
from utils.cli import PRECISIONS, HelpFormatter, add_list  # noqa: E402
from utils.tables import markdown_table  # noqa: E402


class _Enough(Exception):
    """Raised inside the tiling loop once ``max_forwards`` forwards have run."""


def peak_rss_mib() -> float:
    """This process's high-water mark of resident memory (``VmHWM``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the peak is read from Linux's /proc")


def make_photo(path: str, width: int, height: int, seed: int = 0) -> None:
    """A rainy-looking synthetic photo: smooth colour fields under bright slanted streaks."""
    import numpy as np
    import torch

    from utils.images import save_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([0.5 + 0.35 * np.sin(xx / (97 + 31 * c) + yy / (151 - 23 * c) + c) for c in range(3)])
    seeds = (rng.random((height, width)) > 0.998).astype(np.float32)
    streaks = np.zeros_like(seeds)
    for k in range(24):  # smear each seed along a slanted line
        streaks += np.roll(seeds, (k, k // 3), axis=(0, 1))
    img = np.clip(img + 0.5 * np.clip(streaks, 0, 1)[None], 0, 1)
    save_image(torch.from_numpy(img), path)


def prepare(model_name: str, path: str, seed: int) -> None:
    """Save a CoIC checkpoint of ``model_name``'s reference configuration (model + encoder)."""
    import torch

    from models import build_encoder, build_model
    from utils.checkpoint import save_atomic

    torch.manual_seed(seed)
    model, encoder = build_model(model_name), build_encoder(dim=128)
    save_atomic({"model_name": model_name, "model_hparams": {}, "model": model.state_dict(),
                 "encoder": encoder.state_dict(), "encoder_hparams": {"dim": 128}}, path)


def measure(request: dict) -> dict:
    """Run ``test_model.main`` on the photo folder in this process, timing each backbone forward."""
    import runpy

    import torch

    import utils.eval.inference
    import utils.eval.precision
    from utils.eval import memory
    from utils.tiling import tile_boxes

    torch.set_num_threads(request["threads"])
    limit, forwards, cpu, plans, counts = request["max_forwards"], [], [], [], []
    started = time.perf_counter()
    first_forward: list[float] = []
    real_plan, real_tiled = memory.MemoryPlanner.plan, utils.eval.inference.tiled_apply

    def plan(self, h, w, z=None, scored=False):
        p = real_plan(self, h, w, z, scored)
        plans.append({"tile": p.tile, "batch": p.batch, "estimate_mib": p.estimate / 2 ** 20,
                      "budget_mib": self.budget / 2 ** 20})
        return p

    def tiled(fn, x, tile, overlap=32, batch=4, **options):
        counts.append(-(-len(tile_boxes(*x.shape[-2:], tile, overlap)) // batch))

        def timed(t):
            if not first_forward:
                first_forward.append(time.perf_counter() - started)
            start, start_cpu = time.perf_counter(), time.process_time()
            y = fn(t)
            forwards.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            if limit and len(forwards) >= limit:
                raise _Enough
            return y

        return real_tiled(timed, x, tile, overlap=overlap, batch=batch, **options)

    real_setting, settings = utils.eval.precision.inference_setting, []

    def setting(*args, **kwargs):
        chosen = real_setting(*args, **kwargs)
        settings.append(chosen.label)
        return chosen

    memory.MemoryPlanner.plan, utils.eval.inference.tiled_apply = plan, tiled
    utils.eval.precision.inference_setting = setting
    stopped, rc = False, 0
    sys.argv = ["test_model.py", "--test_model", request["checkpoint"], "--model_name", request["model"],
                "--load_mode", "tran", "--test_dir", request["photos"], "--save_path", request["out"],
                "--max_memory", request["max_memory"], "--precision", request.get("precision", "auto")]
    try:  # the script itself, as `python test_model.py ...` runs it (with the three hooks above)
        runpy.run_path(os.path.join(ROOT, "test_model.py"), run_name="__main__")
    except SystemExit as done:
        rc = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except _Enough:
        stopped = True
    return {"model": request["model"], "rc": rc, "stopped": stopped, "seconds": time.perf_counter() - started,
            "setting": settings[0] if settings else None, "forwards": forwards, "cpu_forwards": cpu,
            "total_forwards": counts[0] if counts else 1, "plans": plans,
            "to_first_forward": first_forward[0] if first_forward else None, "peak_mib": peak_rss_mib()}


def summarise(result: dict) -> dict:
    """One table row: the plan, the peak against the budget, measured or extrapolated seconds."""
    plan = result["plans"][0] if result["plans"] else {}
    row = {"model": result["model"], "tile": plan.get("tile"), "batch": plan.get("batch"),
           "forwards": result["total_forwards"], "estimate_mib": plan.get("estimate_mib"),
           "budget_mib": plan.get("budget_mib"), "peak_mib": result["peak_mib"], "rc": result["rc"],
           "setting": result.get("setting")}
    row["cpu_per_forward"] = statistics.median(result["cpu_forwards"]) if result["cpu_forwards"] else None
    row["within_budget"] = row["budget_mib"] is not None and row["peak_mib"] <= row["budget_mib"]
    if result["stopped"]:
        per = statistics.median(result["forwards"])
        row.update(seconds=result["to_first_forward"] + per * result["total_forwards"], extrapolated=True,
                   measured_forwards=len(result["forwards"]), seconds_per_forward=per)
    else:
        row.update(seconds=result["seconds"], extrapolated=False, measured_forwards=len(result["forwards"]),
                   seconds_per_forward=statistics.median(result["forwards"]) if result["forwards"] else None)
    return row


def markdown(rows: list[dict], header: str) -> str:
    cells = []
    for r in rows:
        plan = "whole image" if r["tile"] is None else f"{r['tile']}² tiles, {r['batch']} per forward"
        secs = f"{r['seconds']:.0f}" + (f" (extrapolated from {r['measured_forwards']})" if r["extrapolated"] else "")
        per = "" if r["seconds_per_forward"] is None else f"{r['seconds_per_forward']:.1f} ({r['cpu_per_forward']:.1f})"
        cells.append([r["model"], r.get("setting") or "", plan, r["forwards"], f"{r['estimate_mib']:.0f}",
                      f"{r['peak_mib']:.0f}", f"{r['budget_mib']:.0f}", "yes" if r["within_budget"] else "**no**", secs, per])
    lines = ["# test_model.py on a large photo", "", header, "",
             *markdown_table(["backbone (CoIC)", "setting", "plan", "forwards", "estimated peak MiB",
                              "measured peak MiB (VmHWM)", "budget MiB", "within budget", "seconds", "s per forward (CPU s)"], cells)]
    lines += ["", "- measured peak: the kernel's high-water mark of the test_model.py process's resident memory",
              "- extrapolated: the run stopped after that many forwards; seconds = time to the first forward "
              "+ forwards × their median",
              "- s per forward: wall-clock median, and the process's CPU time (which leaves out waiting for a core)"]
    return "\n".join(lines) + "\n"


def _worker(argv: Sequence[str]) -> int:
    """``--prepare`` / ``--measure`` in a fresh process; the result as JSON on the last line."""
    request = json.loads(argv[1])
    if argv[0] == "--prepare":
        prepare(request["model"], request["checkpoint"], request["seed"])
        return 0
    print(json.dumps(measure(request)))
    return 0


def _call(flag: str, request: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.large_photo", flag, json.dumps(request)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag[2:]} of {request['model']} failed with exit code {proc.returncode} (its "
                           "traceback is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if flag == "--measure" else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_list(p, "--models", default=available_models(), choices=available_models(), metavar="NAME",
             help="backbones, space- or comma-separated (default: every registered one)")
    p.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photo")
    p.add_argument("--max_memory", default="4G", help="test_model.py's --max_memory")
    p.add_argument("--max_forwards", type=int, default=0, help="stop each run after this many forwards (0: all)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="test_model.py's --precision (auto: its default for the backbone's CoIC mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_path", default="benchmarks/results", help="large_photo.json and .md go here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--prepare", "--measure"):
        return _worker(argv)
    args = build_parser().parse_args(argv)
    from utils.errors import UserError, cli_main

    def work() -> int:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 4000x3000") from None
        return run(args, width, height)

    return cli_main(work)


def run(args: argparse.Namespace, width: int, height: int) -> int:
    import torch

    from utils.errors import UserError
    from utils.eval.precision import cpu_model_name
    from utils.io import atomic_write_text

    os.makedirs(args.save_path, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="coic_large_") as tmp:
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        make_photo(os.path.join(photos, "photo.png"), width, height, args.seed)
        for name in args.models:
            print(f"{name}: {width}x{height}, --max_memory {args.max_memory} ...", file=sys.stderr, flush=True)
            request = {"model": name, "checkpoint": os.path.join(tmp, f"{name}.pth"), "seed": args.seed,
                       "photos": photos, "out": os.path.join(tmp, f"out_{name}"), "threads": args.threads,
                       "max_memory": args.max_memory, "max_forwards": args.max_forwards,
                       "precision": args.precision}
            _call("--prepare", request)
            result = _call("--measure", request)
            if result["rc"] != 0:
                raise UserError(f"{name}: test_model.py ended with exit code {result['rc']} (its error is above)")
            row = summarise(result)
            os.remove(request["checkpoint"])
            rows.append(row)
            print(f"{name}: peak {row['peak_mib']:.0f} MiB of {row['budget_mib']:.0f}, {row['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    header = (f"{width}x{height} photo | {cpu_model_name()}, {args.threads} thread(s) | torch {torch.__version__} | "
              f"{time.strftime('%Y-%m-%d %H:%M')} | --max_memory {args.max_memory} | --precision {args.precision}")
    text = markdown(rows, header)
    atomic_write_text(os.path.join(args.save_path, "large_photo.md"), text)
    atomic_write_text(os.path.join(args.save_path, "large_photo.json"), json.dumps({"header": header, "rows": rows},
                                                                                 indent=1))
    print(text)
    return 0 if all(r["within_budget"] and r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
