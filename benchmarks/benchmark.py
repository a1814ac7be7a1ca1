"""Training and inference speed of every backbone, ours side by side with the published code.

    python -m benchmarks.benchmark                                    # reference batch/crop, every backbone
    python -m benchmarks.benchmark --small --iters 3 --warmup 1 --infer_size 256 --rounds 3 \\
        --published /tmp/coic_published                               # CPU-sized, against the published code
    python -m benchmarks.benchmark --models BRN DGUNet --settings recommended --batch_size 8
    python -m benchmarks.benchmark --tiny --iters 1 --warmup 0 --infer_size 64   # smoke run, tiny models

For each backbone of the registry (``models.available_models()``; reference hyper-parameters;
batch/crop from its recipe, ``--small``, or ``--batch_size/--crop_size``) and each precision setting (``fp32``;
``recommended`` = ``utils.eval.precision.recommended_setting``: bf16 autocast + channels_last on CUDA and on
CPUs with native bf16, plain fp32 on other CPUs, then measured once):

- training images/s of the real ``Trainer.train_step`` in stage 1 (no z) and in the CoIC stage
  (negatives, MoCo, modulated backbone, two optimizers), fed random in-memory batches: the
  data loader is not timed;
- peak memory of building the model and training (CUDA: ``max_memory_allocated``; CPU: peak
  RSS above the RSS before the model is built, from Linux's ``/proc`` high-water mark);
- inference ms per ``--infer_size`` image through ``utils.eval.inference.restore``, without z and
  with z from the key encoder (IDT is tiled at its training size).

``--published DIR`` (a checkout of github Schizophreni/CoIC) measures the published code the way
its ``train_<X>.py`` scripts run it (``benchmarks/published.py``); a backbone whose registry entry
declares no published counterpart (``published_code``) is timed for ours only, with a note in its
row. Every case runs in a fresh process, so memory numbers do not inherit a previous case's heap
and the two code bases (both have a top-level ``models`` package) never meet. Step times are the
median of ``--iters`` timed iterations after ``--warmup`` untimed ones. Results: ``benchmark.md``
and ``benchmark.csv`` in ``--save_path``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The measuring helpers live in ``benchmarks.timing`` (``benchmarks.published`` imports them in a
# process whose ``models`` package must be the published code's); the names are re-exported here.
from benchmarks.published import counterparts  # noqa: E402
from benchmarks.timing import (Case, measure_ours, run_worker, synthetic_batch, time_calls,  # noqa: E402,F401
                               worker_main)
from utils import tables  # noqa: E402
from utils.allocator import keep_freed_memory  # noqa: E402
from utils.cli import Parser, add_device_args, add_list  # noqa: E402

SMALL_BATCH, SMALL_CROP = 2, 64  # --small: fits every backbone (IDT needs 64 or a multiple of 128)
RESULT_NAME = "benchmark"

COLUMNS = ["backbone", "setting", "batch", "crop", "infer_size",
           "ours_stage1_img_s", "ours_coic_img_s", "published_stage1_img_s", "published_coic_img_s",
           "speedup_stage1", "speedup_coic", "ours_peak_mib", "published_peak_mib",
           "ours_infer_normal_ms", "ours_infer_coic_ms", "published_infer_normal_ms", "published_infer_coic_ms",
           "note"]
# Markdown headers of COLUMNS (same order).
HEADERS = ["backbone", "setting", "batch", "crop", "infer size", "ours stage-1 img/s", "ours CoIC img/s",
           "published stage-1 img/s", "published CoIC img/s", "speed-up stage-1", "speed-up CoIC",
           "ours peak MiB", "published peak MiB", "ours infer normal ms", "ours infer CoIC ms",
           "published infer normal ms", "published infer CoIC ms", "note"]


class BenchmarkError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Precision:
    """A precision setting resolved for one device."""
    label: str
    amp: Optional[str]  # None or "bf16" (the Trainer's --amp)
    channels_last: bool


def resolve_setting(name: str, device: torch.device) -> Precision:
    """``fp32``, or ``recommended``: ``utils.eval.precision.recommended_setting`` (bf16 autocast + channels_last
    on CUDA and on CPUs with native bf16; fp32 on other CPUs, measured once with fp32)."""
    from utils.eval.precision import recommended_setting

    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "recommended":
        rec = recommended_setting(device)
        if rec.amp is None and not rec.channels_last:
            return Precision(f"recommended (= fp32 on {device.type.upper()})", None, False)
        return Precision(f"recommended ({rec.label})", rec.amp, rec.channels_last)
    raise BenchmarkError(f"unknown setting {name!r}; choose fp32 or recommended")


def unique_settings(names: Sequence[str], device: torch.device) -> list[Precision]:
    """Resolved settings with duplicates merged (on a CPU both settings are fp32: measured once)."""
    merged: dict[tuple, Precision] = {}
    for name in names:
        p = resolve_setting(name, device)
        key = (p.amp, p.channels_last)
        if key in merged:
            first = merged[key]
            merged[key] = Precision(f"{first.label.split(' ')[0]} = {name}", first.amp, first.channels_last)
        else:
            merged[key] = p
    return list(merged.values())


def _measure_ours_params(params: dict) -> dict:
    return measure_ours(Case(**params))


# --------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU model from /proc/cpuinfo."""
    from utils.eval.precision import cpu_model_name

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def header_line(device: torch.device, threads: int, warmup: int, iters: int, rounds: int = 1) -> str:
    rounds_text = f"; median of {rounds} rounds" if rounds > 1 else ""
    return (f"device: {device_name(device)} ({device.type}), {threads} thread{'s' if threads != 1 else ''} | "
            f"torch {torch.__version__} | "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | median of {iters} timed iterations "
            f"after {warmup} warm-up{rounds_text}")


def median_result(results: Sequence[dict]) -> dict:
    """One result from several rounds: the median of each timing and memory figure, the largest
    count of skipped steps, the first error if any round failed."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    merged = {}
    for key, value in results[0].items():
        if key == "skipped_steps":
            merged[key] = max(r[key] for r in results)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in results)
        else:
            merged[key] = value
    return merged


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def make_row(case: Case, label: str, ours: dict, published: Optional[dict]) -> dict:
    """One table row from our result and the published one (None: not measured)."""
    pub = published or {}
    notes = []
    if "error" in ours:
        notes.append(f"ours failed: {ours['error']}")
    elif ours.get("skipped_steps"):
        notes.append(f"ours skipped {ours['skipped_steps']} steps (non-finite/exploding output)")
    if ours.get("cuda_syncs_per_step") is not None:
        notes.append(f"ours: {ours['cuda_syncs_per_step']} host-GPU syncs in a CoIC step")
    if published is not None and "error" in pub:
        notes.append(f"published not measured: {pub['error']}")
    elif "ours_only" in pub:
        notes.append(pub["ours_only"])
    elif pub.get("contrast_inputs_ms") is not None:
        # Timed inside both published steps: the scripts build them in stage 1 as well.
        notes.append(f"published batch transforms + rain negatives: {pub['contrast_inputs_ms']:.0f} ms/step")
    row = {"backbone": case.model, "setting": label, "batch": case.batch, "crop": case.crop,
           "infer_size": case.infer_size,
           "ours_stage1_img_s": ours.get("stage1_img_s"), "ours_coic_img_s": ours.get("coic_img_s"),
           "published_stage1_img_s": pub.get("stage1_img_s"), "published_coic_img_s": pub.get("coic_img_s"),
           "ours_peak_mib": ours.get("peak_mib"), "published_peak_mib": pub.get("peak_mib"),
           "ours_infer_normal_ms": ours.get("infer_normal_ms"), "ours_infer_coic_ms": ours.get("infer_coic_ms"),
           "published_infer_normal_ms": pub.get("infer_normal_ms"),
           "published_infer_coic_ms": pub.get("infer_coic_ms"), "note": "; ".join(notes)}
    row["speedup_stage1"] = _ratio(row["ours_stage1_img_s"], row["published_stage1_img_s"])
    row["speedup_coic"] = _ratio(row["ours_coic_img_s"], row["published_coic_img_s"])
    return {k: row[k] for k in COLUMNS}


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    return "\n".join(tables.markdown_table(HEADERS, [[_fmt(row[c]).replace("|", "/") for c in COLUMNS]
                                                      for row in rows]))


def markdown(rows: list[dict], header: str, notes: Sequence[str]) -> str:
    """The whole Markdown report: title, header line, table, notes."""
    parts = ["# Benchmark", "", header, "", markdown_table(rows), ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def write_results(rows: list[dict], header: str, notes: Sequence[str], save_path: str) -> tuple[str, str]:
    """Write ``benchmark.md`` and ``benchmark.csv`` into ``save_path``; their paths."""
    os.makedirs(save_path, exist_ok=True)
    md_path = os.path.join(save_path, f"{RESULT_NAME}.md")
    csv_path = os.path.join(save_path, f"{RESULT_NAME}.csv")
    with open(md_path, "w") as f:
        f.write(markdown(rows, header, notes))
    with open(csv_path, "w", newline="") as f:
        f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return md_path, csv_path


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Training and inference speed of each backbone (ours, and optionally the published code "
                           "side by side).")
    from models import available_models  # the registry: any registered backbone can be measured

    add_list(p, "--models", default=available_models(), metavar="NAME",
             help=f"backbones to measure, space- or comma-separated (default: {', '.join(available_models())})")
    add_list(p, "--settings", default=["fp32", "recommended"], choices=["fp32", "recommended"],
                   help="precision settings; recommended = bf16 autocast + channels_last on CUDA and on CPUs with "
                        "native bf16, fp32 on other CPUs")
    p.add_argument("--batch_size", type=int, default=None,
                   help="training batch size for every backbone (default: each recipe's, or 2 with --small)")
    p.add_argument("--crop_size", type=int, default=None,
                   help="training crop for every backbone (default: each recipe's, or 64 with --small)")
    p.add_argument("--small", action="store_true",
                   help=f"CPU-sized cases: batch {SMALL_BATCH}, crop {SMALL_CROP} "
                        "(model sizes stay the reference ones)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: each recipe's tiny model, batch and crop (checks that every backbone "
                        "runs; the numbers say nothing about the reference models)")
    p.add_argument("--infer_size", type=int, default=512, help="side of the square image timed at inference")
    p.add_argument("--tile_overlap", type=int, default=32,
                   help="overlap of inference tiles for backbones that tile (IDT), ours and published alike")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before each timing")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--concurrent", action="store_true",
                   help="with --published: run ours and the published code at the same time, each in its own "
                        "process (use with --threads 1 on a machine with 2+ cores: both see the same machine state)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, ours and the published code alternating, and report "
                        "the median of the rounds (steadier on a shared or throttled machine)")
    add_device_args(p, "measure")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per case (default: torch's default); on cores shared with other work use 1: "
                        "a multi-threaded region waits for descheduled threads and times become meaningless")
    p.add_argument("--published", default=None, metavar="DIR",
                   help="checkout of github Schizophreni/CoIC to measure side by side")
    p.add_argument("--save_path", default=os.path.join("benchmarks", "results"),
                   help="folder for benchmark.md and benchmark.csv")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of one CoIC step per case into --save_path")
    p.add_argument("--data_dir", default=None,
                   help="folder with rain/ and norain/ to construct the Trainer on (default: a temporary demo set)")
    p.add_argument("--case_timeout", type=float, default=1800, help="seconds before a case's process is stopped")
    p.add_argument("--worker_params", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    return p


def _check_args(args: argparse.Namespace) -> torch.device:
    from models import available_models

    unknown = [m for m in args.models if m not in available_models()]
    if unknown:
        raise BenchmarkError(f"unknown --models {', '.join(unknown)}; choose from {', '.join(available_models())}")
    for key, low in (("batch_size", 1), ("crop_size", 8), ("infer_size", 8), ("iters", 1), ("rounds", 1), ("warmup", 0),
                     ("threads", 1), ("tile_overlap", 0)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise BenchmarkError(f"--{key} must be at least {low}, got {value}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise BenchmarkError(f"--data_dir {args.data_dir} is not a folder")
    if args.published is not None and not os.path.isdir(os.path.join(args.published, "models")):
        raise BenchmarkError(f"--published {args.published} is not a checkout of Schizophreni/CoIC "
                             "(no models/ folder)")
    if args.use_GPU and not torch.cuda.is_available():
        raise BenchmarkError("--use_GPU asks for CUDA, which is not available here; drop it to measure the CPU")
    return torch.device(f"cuda:{int(args.gpu_id)}" if args.use_GPU else "cpu")


def case_sizes(model: str, args: argparse.Namespace) -> tuple[int, int]:
    """(batch, crop) of ``model``: the flags, else --tiny, else --small, else the recipe's reference."""
    from utils.train.recipes import get_recipe

    recipe = get_recipe(model)
    if args.tiny:
        default_batch, default_crop = (recipe.tiny.get("batch_size", recipe.batch_size),
                                       recipe.tiny.get("crop_size", recipe.crop_size))
    elif args.small:
        default_batch, default_crop = SMALL_BATCH, SMALL_CROP
    else:
        default_batch, default_crop = recipe.batch_size, recipe.crop_size
    return args.batch_size or default_batch, args.crop_size or default_crop


def _demo_folder(tmp: str) -> str:
    """A one-folder demo set to construct the Trainer on (its images are never read: the
    measured batches are in memory, and the dataset pads images smaller than the crop)."""
    from utils.data.demo import build_demo_data

    root = build_demo_data(os.path.join(tmp, "demo"), train_per_source=1, train_size=32, test_size=32)
    return os.path.join(root, "light", "train")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # ours runs as its commands do (utils.allocator); the published code as it ships
    if args.worker_params:
        return worker_main(args.worker_params, args.worker_out, _measure_ours_params)
    from utils.errors import cli_main

    return cli_main(lambda: run(args), also=(BenchmarkError,))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = _check_args(args)
    threads = args.threads or torch.get_num_threads()
    settings = unique_settings(args.settings, device)
    tmp = tempfile.mkdtemp(prefix="coic_bench_")
    try:
        sizes = {m: case_sizes(m, args) for m in args.models}
        data_dir = args.data_dir or _demo_folder(tmp)
        cases = []
        for model in args.models:
            batch, crop = sizes[model]
            for s in settings:
                cases.append((Case(model, batch, crop, s.amp, s.channels_last, str(device), threads, args.warmup,
                                   args.iters, args.infer_size, args.tile_overlap, os.path.abspath(data_dir),
                                   tiny=args.tiny), s))
        published: dict[str, dict] = {}
        timed = counterparts(args.models) if args.published else {}
        for model in args.models:
            if args.published and model not in timed:
                published[model] = {"ours_only": f"no published counterpart of {model} (its published_code in "
                                                 "models/__init__.py): timed for ours only"}
        total = args.rounds * (len(cases) + len(timed))
        rows, failed = [], False
        with tqdm(total=total, desc="benchmark", unit="case", dynamic_ncols=True) as bar:
            for case, setting in cases:
                label = setting.label.split(' ')[0]
                if args.profile:
                    case.profile_path = os.path.abspath(os.path.join(
                        args.save_path, f"profile_ours_{case.model}_{label}.txt"))
                ours_rounds, published_rounds = [], []
                for r in range(args.rounds):  # alternate, so that drift of the machine hits both alike
                    ours_job = functools.partial(run_worker, "benchmarks.benchmark", vars(case), REPO_ROOT,
                                                 args.case_timeout)
                    with_published = bool(args.published) and case.model not in published
                    if with_published and args.concurrent:  # same moment, one core each
                        bar.set_postfix_str(f"{case.model} {label} ours + published, round {r + 1}")
                        with ThreadPoolExecutor(max_workers=2) as pool:
                            ours_future, published_future = pool.submit(ours_job), pool.submit(run_published, case,
                                                                                               args)
                            ours_rounds.append(ours_future.result())
                            published_rounds.append(published_future.result())
                        bar.update(2)
                        continue
                    bar.set_postfix_str(f"{case.model} {label} ours, round {r + 1}")
                    ours_rounds.append(ours_job())
                    bar.update(1)
                    if with_published:
                        bar.set_postfix_str(f"{case.model} published, round {r + 1}")
                        published_rounds.append(run_published(case, args))
                        bar.update(1)
                ours = median_result(ours_rounds)
                failed |= "error" in ours
                if published_rounds:
                    published[case.model] = median_result(published_rounds)
                rows.append(make_row(case, setting.label, ours, published.get(case.model)))
        header = header_line(device, threads, args.warmup, args.iters, args.rounds)
        md_path, csv_path = write_results(rows, header, report_notes(args, device), args.save_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(header)
    print(markdown_table(rows))
    print(f"written: {md_path}, {csv_path}")
    return 1 if failed else 0


def run_published(case: Case, args: argparse.Namespace) -> dict:
    """The published code's numbers for ``case``'s backbone, batch and crop (always fp32)."""
    from models import backbone

    payload = dict(vars(case), amp=None, channels_last=False, directory=os.path.abspath(args.published),
                   published_code=backbone(case.model).published_code)
    if args.profile:
        payload["profile_path"] = os.path.abspath(os.path.join(args.save_path, f"profile_published_{case.model}.txt"))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.py")
    # cwd: the published RCDNet reads models/kernel.mat relative to it.
    return run_worker(script, payload, os.path.abspath(args.published), args.case_timeout)


def report_notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    notes = [
        "img/s = batch / median step time of the full training step (forward, loss, backward, both optimizer "
        "steps) on random in-memory batches; the data loader is not timed.",
        "speed-up = ours img/s / published img/s (> 1: ours is faster).",
        "peak MiB: " + ("torch.cuda.max_memory_allocated over model build + training." if device.type == "cuda"
                        else "peak RSS above the RSS before the model was built (model, optimizers, activations)."),
        "inference: ms for one square image of the 'infer size'; CoIC = z from the key encoder on the 128x128 "
        f"resize + modulated backbone; tiling backbones (IDT) tile at their training crop with overlap "
        f"{args.tile_overlap}.",
    ]
    if args.published and args.concurrent:
        notes.append("--concurrent: ours and the published code ran at the same time, each in its own process "
                     f"with {args.threads or torch.get_num_threads()} thread(s).")
    if args.published:
        notes.append("published: the code of github Schizophreni/CoIC in fp32 as its train_<X>.py scripts run an "
                     "iteration (their batch transforms and rain negatives run in stage 1 too); the same numbers "
                     "stand beside every setting of a backbone.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
