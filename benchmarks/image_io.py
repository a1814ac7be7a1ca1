"""Image loading speed: Pillow vs OpenCV for what the training loader does per item.

    python -m benchmarks.image_io [--demo_root demo_data] [--repeats 15]

Per image set (the demo training PNGs when present, and synthetic 481x321 and 2000x1500 PNG
pairs): PNG decode, one training item (decode rain + clean, crop, flip, the 128x128 encoder
view), the 128x128 resize alone (torch's antialiased bilinear, which training uses, against
OpenCV's INTER_AREA with its largest difference in grey levels), and one epoch of
``MixedRainDataset`` with 0 workers, and writing a PNG (Pillow's ``save`` against our
``write_array``: OpenCV at the same compression level, atomic). One thread, median of ``--repeats``. Writes
``image_io.md`` to ``--save_path`` and prints it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


import cv2
import numpy as np
import torch
from PIL import Image

from utils import images
from utils.cli import HelpFormatter
from utils.tables import markdown_table


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def synthetic_pairs(root: str, width: int, height: int, count: int = 4) -> str:
    """``count`` rain/norain PNG pairs of natural pictures (scikit-image's) at width x height."""
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    folder = os.path.join(root, f"{width}x{height}")
    for sub in ("rain", "norain"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        clean = cv2.resize(sources[i % len(sources)], (width, height), interpolation=cv2.INTER_CUBIC)
        rain = np.clip(clean.astype(int) + rng.integers(0, 60, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).save(os.path.join(folder, "norain", f"{i}.png"))
        Image.fromarray(rain).save(os.path.join(folder, "rain", f"{i}.png"))
    return folder


def _with_backend(backend: str, fn):
    previous, images.PNG_BACKEND = images.PNG_BACKEND, backend
    try:
        return fn()
    finally:
        images.PNG_BACKEND = previous


def measure(folder: str, repeats: int, crop: int = 128) -> dict:
    from datasets import MixedRainDataset, SampleKey

    rain_path = os.path.join(folder, "rain", sorted(os.listdir(os.path.join(folder, "rain")))[0])
    row = {"images": folder}
    dataset = MixedRainDataset([folder], crop)

    def item() -> None:
        dataset[SampleKey(0, 1)]

    def epoch() -> None:
        for i in range(len(dataset)):
            dataset[SampleKey(i, i)]

    for backend in ("pillow", "opencv"):
        row[f"decode_{backend}"] = _with_backend(backend, lambda: _median_ms(
            lambda: images.decode_native(rain_path), repeats))
        row[f"item_{backend}"] = _with_backend(backend, lambda: _median_ms(item, repeats))
        row[f"epoch_{backend}"] = _with_backend(backend, lambda: _median_ms(epoch, max(3, repeats // 5)))
    img = images.read_image(rain_path)
    h, w = img.shape[-2:]
    row["size"] = f"{w}x{h}"
    row["resize_torch"] = _median_ms(lambda: images.resize_square(img, 128), repeats)
    arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    row["resize_opencv"] = _median_ms(lambda: cv2.resize(arr, (128, 128), interpolation=cv2.INTER_AREA), repeats)
    diff = np.abs(cv2.resize(arr, (128, 128), interpolation=cv2.INTER_AREA)
                  - images.resize_square(img, 128).permute(1, 2, 0).numpy())
    row["resize_max_levels"] = float(diff.max() * 255)
    out = tempfile.mkdtemp()
    rgb8 = (arr * 255).round().astype(np.uint8)
    row["write_pillow"] = _median_ms(lambda: Image.fromarray(rgb8).save(os.path.join(out, "p.png")), repeats)
    row["write_opencv"] = _median_ms(lambda: images.write_array(rgb8, os.path.join(out, "o.png")), repeats)
    return row


def report(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"CPU: {cpu}, 1 thread, torch {torch.__version__}, OpenCV {cv2.__version__}; ms, median",
             "",
             *markdown_table(
                 ["images", "size", "PNG decode Pillow / OpenCV", "training item Pillow / OpenCV",
                  "epoch Pillow / OpenCV", "128² resize torch / OpenCV (max diff, grey levels)",
                  "PNG write Pillow / ours (OpenCV)"],
                 [[os.path.basename(r["images"].rstrip("/")), r["size"],
                   f"{r['decode_pillow']:.2f} / {r['decode_opencv']:.2f} "
                   f"({r['decode_pillow'] / r['decode_opencv']:.2f}x)",
                   f"{r['item_pillow']:.2f} / {r['item_opencv']:.2f} ({r['item_pillow'] / r['item_opencv']:.2f}x)",
                   f"{r['epoch_pillow']:.0f} / {r['epoch_opencv']:.0f}",
                   f"{r['resize_torch']:.2f} / {r['resize_opencv']:.2f} ({r['resize_max_levels']:.1f})",
                   f"{r['write_pillow']:.2f} / {r['write_opencv']:.2f}"] for r in rows])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--demo_root", default="demo_data", help="demo data to time when present (heavy/train)")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions per measurement (median)")
    p.add_argument("--save_path", default="benchmarks/results/image_io", help="where image_io.md is written")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    folders = []
    demo = os.path.join(args.demo_root, "heavy", "train")
    if os.path.isdir(demo):
        folders.append(demo)
    with tempfile.TemporaryDirectory() as tmp:
        folders += [synthetic_pairs(tmp, 481, 321), synthetic_pairs(tmp, 2000, 1500)]
        rows = [measure(f, args.repeats) for f in folders]
    text = report(rows)
    os.makedirs(args.save_path, exist_ok=True)
    with open(os.path.join(args.save_path, "image_io.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
