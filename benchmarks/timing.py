"""Measuring: clocks, peak memory, synthetic batches, worker processes, and our timed training step.

``benchmarks.benchmark`` (the command line and report) and ``benchmarks.published`` (the published
code's worker) share these helpers. No project module is imported at module level: the published
worker imports this file in a process whose ``models`` package must be the published code's.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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


def time_restorations(fn, n: int, device: torch.device) -> dict:
    """Wall and CPU seconds of each of ``n`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(n):
        synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


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
    tiny: bool = False  # the recipe's tiny model (a smoke run)


def _trainer_flags(case: Case, save_path: str) -> list[str]:
    flags = ["--data_paths", case.data_dir, "--save_path", save_path, "--batch_size", str(case.batch),
             "--crop_size", str(case.crop), "--num_workers", "0", "--no_resume"]
    device = torch.device(case.device)
    if device.type == "cuda":
        flags += ["--use_GPU", "--gpu_id", str(device.index or 0)]
    if case.amp:
        flags += ["--precision", case.amp]
    if case.channels_last:
        flags += ["--memory_format", "channels_last"]
    if case.tiny:
        flags.append("--tiny")
    return flags


def measure_ours(case: Case) -> dict:
    """Time our real ``Trainer.train_step`` (both stages) and ``restore`` for one case.

    The Trainer is built by ``parse_train_args`` exactly as ``train_<Backbone>.py`` builds it
    (reference model flags; only batch, crop, device and precision are set), on a one-folder
    data set that is only opened, never read: batches are random tensors in memory.
    """
    from utils.eval.inference import image_code, restore
    from utils.train.config import parse_train_args
    from utils.train.trainer import Trainer

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
    """Run ``script --worker_params P --worker_out O`` in a fresh Python started in ``cwd``; its result dict.
    ``script`` is a file (``.py``) or a module run with ``-m`` (``benchmarks.benchmark``, with ``cwd`` the
    repository's root).

    A failure comes back as ``{"error": <last line the worker printed to stderr>}``.
    """
    with tempfile.TemporaryDirectory(prefix="coic_bench_io_") as tmp:
        params, out = os.path.join(tmp, "params.json"), os.path.join(tmp, "out.json")
        with open(params, "w") as f:
            json.dump(payload, f)
        try:
            proc = subprocess.run([sys.executable, *([script] if script.endswith(".py") else ["-m", script]), "--worker_params",
                                   params, "--worker_out", out],
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
