"""onnxruntime vs PyTorch fp32 ``restore`` per backbone, plain and CoIC, on one CPU thread each.

    python -m benchmarks.onnx_runtime                 # every registered backbone, 256 x 256
    python -m benchmarks.onnx_runtime --models BRN,IDT --repeats 5

Each backbone is built in its reference configuration with random weights (speed does not
depend on them), exported by ``utils.eval.export`` as ``export.py`` exports it, and timed on the same
image: a backbone with a ``tile_size`` (IDT) at its tile. PyTorch times ``restore`` with
``image_code`` (CoIC) under ``torch.set_num_threads(1)``; onnxruntime a session with one intra-op
thread. Prints a markdown table of medians (docs/deploy.md holds the measured one).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch

from models import available_models, build_encoder, build_model, tile_size
from utils.eval.export import export_onnx
from utils.eval.inference import image_code, restore
from utils.cli import Parser, add_alias, add_list
from utils.tables import markdown_row, markdown_table


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backbone(name: str, coic: bool, size: int, repeats: int, folder: str) -> tuple[int, float, float]:
    """(side, PyTorch seconds, onnxruntime seconds) of backbone ``name`` on one side x side image."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(name, **({} if coic else {"dim_in": 0})).eval()
    encoder = build_encoder().eval() if coic else None
    side = tile_size(model) or size
    rain = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    path = os.path.join(folder, f"{name}_{'coic' if coic else 'plain'}.onnx")
    export_onnx(model, encoder, path)

    def torch_run() -> torch.Tensor:
        return restore(model, rain, image_code(encoder, rain) if encoder is not None else None)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"rain": rain.numpy()}
    return side, median_seconds(torch_run, repeats), median_seconds(lambda: session.run(None, feed), repeats)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    add_list(p, "--models", default=available_models(), metavar="NAME",
             help="backbones, space- or comma-separated (default: every registered one)")
    add_alias(p, "--names", "--models")
    p.add_argument("--size", type=int, default=256, help="image side (a tiled backbone: its tile)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is shown)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, 1 thread each; median of {args.repeats}\n")
    print("\n".join(markdown_table(["backbone", "mode", "image", "PyTorch fp32 (ms)", "onnxruntime (ms)", "speed-up"],
                                   [], align=[None, None, None, "right", "right", "right"])))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for coic in (False, True):
                side, t_torch, t_ort = time_backbone(name, coic, args.size, args.repeats, folder)
                print(markdown_row([name, "CoIC" if coic else "plain", f"{side}x{side}", f"{1e3 * t_torch:.0f}",
                                    f"{1e3 * t_ort:.0f}", f"{t_torch / t_ort:.2f}x"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
