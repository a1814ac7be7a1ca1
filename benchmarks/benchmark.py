"""Training and inference speed of every backbone, ours side by side with the published code.

    python -m benchmarks.benchmark                                    # reference batch/crop, all five
    python -m benchmarks.benchmark --small --iters 3 --warmup 1 --infer_size 256 --rounds 3 \\
        --published /tmp/coic_published                               # CPU-sized, against the published code
    python -m benchmarks.benchmark --models BRN DGUNet --settings recommended --batch_size 8

For each backbone (reference hyper-parameters; batch/crop from its recipe, ``--small``, or
``--batch_size/--crop_size``) and each precision setting (``fp32``; ``recommended`` = bf16
autocast + channels_last on CUDA, which is plain fp32 on a CPU and then measured once):

- training images/s of the real ``Trainer.train_step`` in stage 1 (no z) and in the CoIC stage
  (negatives, MoCo, modulated backbone, two optimizers), fed random in-memory batches: the
  data loader is not timed;
- peak memory of building the model and training (CUDA: ``max_memory_allocated``; CPU: peak
  RSS above the RSS before the model is built, from Linux's ``/proc`` high-water mark);
- inference ms per ``--infer_size`` image through ``utils.inference.restore``, without z and
  with z from the key encoder (IDT is tiled at its training size).

``--published DIR`` (a checkout of github Schizophreni/CoIC) measures the published code the way
its ``train_<X>.py`` scripts run it (``benchmarks/published.py``). Every case runs in a fresh
process, so memory numbers do not inherit a previous case's heap and the two code bases (both
have a top-level ``models`` package) never meet. Step times are the median of ``--iters`` timed
iterations after ``--warmup`` untimed ones. Results: ``benchmark.md`` and ``benchmark.csv`` in
``--save_path``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as ``python benchmarks/benchmark.py``: find the repository
    sys.path.insert(0, REPO_ROOT)

# No project module is imported at module level: ``benchmarks.published`` imports the helpers
# below in a process whose ``models`` package must be the published code's.

BACKBONES = ("BRN", "RCDNet", "DGUNet", "IDT", "DRSformer")
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
    """``fp32``, or ``recommended``: bf16 autocast + channels_last on CUDA, fp32 on a CPU.

    On the CPU bf16 autocast and channels_last are slower than fp32 for these networks (see
    README), so the recommendation there is plain fp32.
    """
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "recommended":
        if device.type == "cuda":
            return Precision("recommended (bf16 + channels_last)", "bf16", True)
        return Precision("recommended (= fp32 on CPU)", None, False)
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


# --------------------------------------------------------------------------- measuring helpers
def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_cuda_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """How many times ``fn`` made the host wait for the GPU (CUDA's sync debug mode); None on a CPU."""
    if device.type != "cuda":
        return None
    import warnings

    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_calls(fn: Callable[[int], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls ``fn(i)`` after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        fn(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak memory (MiB) of the work between ``start()`` and ``peak_mib()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; a fresh process holds none before).
    CPU: peak RSS minus the RSS at ``start()``. Linux lets a process reset its RSS high-water
    mark (``/proc/self/clear_refs``), so the peak belongs to this window even after other work;
    elsewhere ``ru_maxrss`` is used, which is right only in a fresh process. None when unknown.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kib: Optional[int] = None
        self.source = "none"

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda"
            return
        rss = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS
            self.base_kib, self.source = rss, "proc"
            return
        except OSError:
            pass
        try:
            self.base_kib, self.source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rusage"
        except (OSError, ValueError):
            self.source = "none"

    def peak_mib(self) -> Optional[float]:
        if self.source == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.source == "proc":
            hwm = _proc_status_kib("VmHWM")
            return None if hwm is None or self.base_kib is None else (hwm - self.base_kib) / 1024
        if self.source == "rusage":
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base_kib) / 1024
        return None


def prime_libraries() -> None:
    """Pay PyTorch's one-time costs before memory is measured.

    The first optimizer built in a process imports ``torch._dynamo`` (~900 modules, ~150 MiB
    of RSS on torch 2.14): a cost of the process, not of the model being measured. So are the
    first convolution's and the first backward's buffers.
    """
    p = torch.zeros(1, requires_grad=True)
    w = torch.zeros(4, 3, 3, 3, requires_grad=True)
    (F.conv2d(torch.zeros(1, 3, 8, 8), w, padding=1).sum() + p.sum()).backward()
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        cls([p]).step()


def synthetic_batch(batch: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rain, clean, query, query_clean), each (batch,3,size,size) in [0,1].

    clean: smooth random colours; rain = clamp(clean + vertical streaks), so rain - clean is a
    plausible rain layer for the rain-aware negatives. The query pair is the same images (the
    loader gives the whole picture resized to the crop size; its content does not change cost).
    """
    low = max(size // 8, 1)
    clean = F.interpolate(torch.rand(batch, 3, low, low, generator=generator), size=(size, size),
                          mode="bilinear", align_corners=False)
    drops = (torch.rand(batch, 1, size, size, generator=generator) < 0.03).float()
    # One-pixel drops smeared vertically into streaks.
    streaks = F.avg_pool2d(drops, (9, 1), stride=1, padding=(4, 0)) * 4.0
    rain = (clean + 0.8 * streaks.clamp(max=1.0)).clamp(0.0, 1.0)
    return rain, clean, rain.clone(), clean.clone()


def median_rate(times: list[float], batch: int) -> float:
    """Images per second at the median step time."""
    return batch / statistics.median(times)


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def write_profile(path: str, fn: Callable[[], object], device: torch.device) -> None:
    """One call of ``fn`` under torch.profiler; the top operators by self time go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=30))


# --------------------------------------------------------------------------- our training step
@dataclass
class Case:
    """One measurement: a backbone at a batch/crop and precision, on a device (JSON-serialisable)."""
    model: str
    batch: int
    crop: int
    amp: Optional[str]
    channels_last: bool
    device: str
    threads: int
    warmup: int
    iters: int
    infer_size: int
    tile_overlap: int
    data_dir: str = ""
    profile_path: str = ""


def _trainer_flags(case: Case, save_path: str) -> list[str]:
    flags = ["--data_paths", case.data_dir, "--save_path", save_path, "--batch_size", str(case.batch),
             "--crop_size", str(case.crop), "--num_workers", "0", "--no_resume", "--device", case.device]
    if case.amp:
        flags += ["--amp", case.amp]
    if case.channels_last:
        flags.append("--channels_last")
    return flags


def measure_ours(case: Case) -> dict:
    """Time our real ``Trainer.train_step`` (both stages) and ``restore`` for one case.

    The Trainer is built by ``parse_train_args`` exactly as ``train_<Backbone>.py`` builds it
    (reference model flags; only batch, crop, device and precision are set), on a one-folder
    data set that is only opened, never read: batches are random tensors in memory.
    """
    from utils.inference import image_code, restore
    from utils.options import parse_train_args
    from utils.trainer import Trainer

    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    save_path = tempfile.mkdtemp(prefix="coic_bench_run_")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        prime_libraries()
        memory = PeakMemory(device)
        memory.start()
        trainer = Trainer(parse_train_args(case.model, _trainer_flags(case, save_path)))
        logging.getLogger("coic").setLevel(logging.WARNING)  # the Trainer's INFO lines are not results
        generator = torch.Generator().manual_seed(0)
        batches = [synthetic_batch(case.batch, case.crop, generator) for _ in range(2)]
        skipped = torch.zeros((), device=device)  # summed on the device: the step itself never syncs

        def step(i: int) -> None:
            nonlocal skipped
            skipped = skipped + trainer.train_step(batches[i % 2])["skipped"]

        trainer.iteration = 0  # stage 1: backbone only
        stage1 = time_calls(step, case.warmup, case.iters, device)
        trainer.iteration = trainer.args.stage1_iters  # CoIC: z, negatives, contrastive loss
        coic = time_calls(step, case.warmup, case.iters, device)
        syncs = count_cuda_syncs(lambda: step(0), device)
        peak = memory.peak_mib()
        if case.profile_path:
            write_profile(case.profile_path, lambda: step(0), device)

        model, encoder = trainer.model.eval(), trainer.encoder.eval()
        memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
        x = synthetic_batch(1, case.infer_size, generator)[0].to(device).contiguous(memory_format=memory_format)

        def infer(with_z: bool) -> Callable[[int], Tensor]:
            def run(i: int) -> Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.amp == "bf16"):
                    z = image_code(encoder, x) if with_z else None
                    return restore(model, x, z, overlap=case.tile_overlap)
            return run

        normal = time_calls(infer(False), case.warmup, case.iters, device)
        modulated = time_calls(infer(True), case.warmup, case.iters, device)
        return {"stage1_img_s": median_rate(stage1, case.batch), "coic_img_s": median_rate(coic, case.batch),
                "peak_mib": peak, "infer_normal_ms": median_ms(normal), "infer_coic_ms": median_ms(modulated),
                "skipped_steps": int(skipped), "cuda_syncs_per_step": syncs}
    finally:
        for h in list(root.handlers):  # the Trainer's log file lives in save_path: close it
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        shutil.rmtree(save_path, ignore_errors=True)


# --------------------------------------------------------------------------- processes
def run_worker(script: str, payload: dict, cwd: str, timeout: float) -> dict:
    """Run ``script --worker_params P --worker_out O`` in a fresh Python; its result dict.

    A failure comes back as ``{"error": <last line the worker printed to stderr>}``.
    """
    with tempfile.TemporaryDirectory(prefix="coic_bench_io_") as tmp:
        params, out = os.path.join(tmp, "params.json"), os.path.join(tmp, "out.json")
        with open(params, "w") as f:
            json.dump(payload, f)
        try:
            proc = subprocess.run([sys.executable, script, "--worker_params", params, "--worker_out", out],
                                  cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s (--case_timeout)"}
        if os.path.isfile(out):
            with open(out) as f:
                return json.load(f)
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"worker exited with status {proc.returncode}"}


def worker_main(params_path: str, out_path: str, measure: Callable[[dict], dict]) -> int:
    """Body of a worker process: measure, write the result (or the error) as JSON."""
    with open(params_path) as f:
        params = json.load(f)
    try:
        result = measure(params)
    except Exception as exc:  # reported in the results table, not a crash of the whole benchmark
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def _measure_ours_params(params: dict) -> dict:
    return measure_ours(Case(**params))


# --------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


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
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


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
    p = argparse.ArgumentParser(description="Training and inference speed of each backbone (ours, and optionally "
                                "the published code side by side).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BACKBONES), metavar="NAME",
                   help=f"backbones to measure ({', '.join(BACKBONES)})")
    p.add_argument("--settings", nargs="+", default=["fp32", "recommended"], choices=["fp32", "recommended"],
                   help="precision settings; recommended = bf16 autocast + channels_last on CUDA, fp32 on a CPU")
    p.add_argument("--batch_size", type=int, default=None,
                   help="training batch size for every backbone (default: each recipe's, or 2 with --small)")
    p.add_argument("--crop_size", type=int, default=None,
                   help="training crop for every backbone (default: each recipe's, or 64 with --small)")
    p.add_argument("--small", action="store_true",
                   help=f"CPU-sized cases: batch {SMALL_BATCH}, crop {SMALL_CROP} "
                        "(model sizes stay the reference ones)")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
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
    unknown = [m for m in args.models if m not in BACKBONES]
    if unknown:
        raise BenchmarkError(f"unknown --models {', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
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
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise BenchmarkError(f"--device {args.device}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {args.device} asks for CUDA, which is not available here")
    if device.type not in ("cpu", "cuda"):
        raise BenchmarkError(f"--device {args.device}: only cpu and cuda are supported")
    return device


def case_sizes(model: str, args: argparse.Namespace) -> tuple[int, int]:
    """(batch, crop) of ``model``: the flags, else --small, else the recipe's reference."""
    from utils.recipes import get_recipe

    recipe = get_recipe(model)
    batch = args.batch_size or (SMALL_BATCH if args.small else recipe.batch_size)
    crop = args.crop_size or (SMALL_CROP if args.small else recipe.crop_size)
    return batch, crop


def _demo_folder(tmp: str) -> str:
    """A one-folder demo set to construct the Trainer on (its images are never read: the
    measured batches are in memory, and the dataset pads images smaller than the crop)."""
    from utils.demo_data import build_demo_data

    root = build_demo_data(os.path.join(tmp, "demo"), train_per_source=1, train_size=32, test_size=32)
    return os.path.join(root, "light", "train")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
                                   args.iters, args.infer_size, args.tile_overlap, os.path.abspath(data_dir)), s))
        published: dict[str, dict] = {}
        total = args.rounds * (len(cases) + (len(args.models) if args.published else 0))
        rows, failed = [], False
        with tqdm(total=total, desc="benchmark", unit="case", dynamic_ncols=True) as bar:
            for case, setting in cases:
                label = setting.label.split(' ')[0]
                if args.profile:
                    case.profile_path = os.path.abspath(os.path.join(
                        args.save_path, f"profile_ours_{case.model}_{label}.txt"))
                ours_rounds, published_rounds = [], []
                for r in range(args.rounds):  # alternate, so that drift of the machine hits both alike
                    ours_job = functools.partial(run_worker, os.path.abspath(__file__), vars(case), REPO_ROOT,
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
    payload = dict(vars(case), amp=None, channels_last=False, directory=os.path.abspath(args.published))
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
