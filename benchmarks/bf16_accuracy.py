"""bf16 + channels-last against float32, through ``test_model.py``'s own evaluation, per rain type.

    python -m benchmarks.bf16_accuracy --test_model baseline-brn --weights_dir DIR
    python -m benchmarks.bf16_accuracy --test_model runs/demo_BRN/ckpt_0001500.pth --load_mode tran

Two sets per rain type of the demo (light, heavy, hazy, multiangle): the demo's test split
(288-pixel pictures) and the same synthetic rain on the demo's test sources enlarged to about
1.2 megapixels (``--large_side``). Each image is derained and scored twice with
``utils.eval.evaluation.evaluate``: once in float32, once in bf16 autocast + channels-last (the
default of a CPU with native bf16). The table gives PSNR against the clean image and NIQE of the
output, per rain type and precision: the difference of the means and the largest difference of a
single image. A backbone's mode is declared ``bf16_verified`` when every rain type's mean PSNR stays
within 0.05 dB and its mean NIQE within 0.05 of float32.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Optional, Sequence


import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.cli import HelpFormatter  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402
from utils.tables import markdown_table  # noqa: E402

PSNR_TOLERANCE, NIQE_TOLERANCE = 0.05, 0.05


def build_large_set(root: str, side: int, images: int = 4, seed: int = 0) -> dict[str, str]:
    """{rain type: folder} of rain/ + norain/ pairs: each demo test source resized to ``side`` on its
    longer edge (keeping its aspect), with the demo's rain of each type added."""
    import torch.nn.functional as F

    from utils.data.demo import RAIN_TYPES, TEST_SOURCES, add_rain, source_picture
    from utils.images import write_array

    folders = {}
    for t, kind in enumerate(RAIN_TYPES):
        rng = np.random.default_rng([seed, 100 + t])
        folder = os.path.join(root, kind)
        for sub in ("rain", "norain"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for i, name in enumerate(TEST_SOURCES[:images]):
            img = torch.from_numpy(source_picture(name)).permute(2, 0, 1)[None]
            h, w = img.shape[-2:]
            scale = side / max(h, w)
            big = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False,
                                antialias=True).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            rainy = add_rain(big, kind, rng)
            write_array(np.round(big * 255).astype(np.uint8), os.path.join(folder, "norain", f"{i:03d}.png"))
            write_array(np.round(rainy * 255).astype(np.uint8), os.path.join(folder, "rain", f"{i:03d}.png"))
        folders[kind] = folder
    return folders


def compare(model, encoder, folders: dict[str, str], device: torch.device, label: str) -> list[dict]:
    """One row per rain type: the mean scores in float32 and in bf16 + channels-last, and the largest
    per-image differences."""
    from utils.eval.evaluation import collect_inputs, evaluate

    rows = []
    for kind, folder in folders.items():
        items = collect_inputs(folder)
        got, seconds = {}, {}
        for name, amp, fmt in (("fp32", None, torch.contiguous_format),
                               ("bf16", torch.bfloat16, torch.channels_last)):
            model.to(memory_format=fmt)
            start = time.perf_counter()
            got[name] = evaluate(model, encoder, items, None, device, progress=False, amp=amp, memory_format=fmt,
                                 metrics=["psnr", "ssim", "niqe"], max_memory=None)
            seconds[name] = time.perf_counter() - start
        model.to(memory_format=torch.contiguous_format)
        row = {"set": label, "rain": kind, "images": len(items),
               "side": "x".join(map(str, _size(items[0][0])))}
        for key in ("psnr", "ssim", "niqe_out"):
            for name in ("fp32", "bf16"):
                values = [r[key] for r in got[name] if r[key] is not None]
                row[f"{key}_{name}"] = float(np.mean(values)) if values else None
            pairs = [(a[key], b[key]) for a, b in zip(got["fp32"], got["bf16"]) if None not in (a[key], b[key])]
            row[f"{key}_maxdiff"] = max((abs(a - b) for a, b in pairs), default=None)
            both = [row[f"{key}_fp32"], row[f"{key}_bf16"]]
            row[f"{key}_meandiff"] = None if None in both else abs(both[1] - both[0])
        row["s_fp32"], row["s_bf16"] = seconds["fp32"], seconds["bf16"]
        rows.append(row)
    return rows


def _size(path: str) -> tuple[int, int]:
    from utils.images import read_header

    header = read_header(path)
    return header.width, header.height


def markdown(rows: list[dict], header: str) -> str:
    def f(v, d):
        return "—" if v is None else f"{v:.{d}f}"

    diffs = ["\\|Δ\\| of means", "largest \\|Δ\\| of an image"]  # a | inside a cell is escaped
    lines = [header, "", *markdown_table(
        ["set", "rain", "images", "size", "PSNR fp32", "PSNR bf16", *diffs, "NIQE fp32", "NIQE bf16", *diffs, "s fp32",
         "s bf16"],
        [[r["set"], r["rain"], r["images"], r["side"], f(r["psnr_fp32"], 2), f(r["psnr_bf16"], 2),
          f(r["psnr_meandiff"], 3), f(r["psnr_maxdiff"], 3), f(r["niqe_out_fp32"], 3), f(r["niqe_out_bf16"], 3),
          f(r["niqe_out_meandiff"], 3), f(r["niqe_out_maxdiff"], 3), f"{r['s_fp32']:.1f}", f"{r['s_bf16']:.1f}"]
         for r in rows])]
    worst = {k: max((r[f"{k}_meandiff"] or 0) for r in rows) for k in ("psnr", "niqe_out")}
    image = {k: max((r[f"{k}_maxdiff"] or 0) for r in rows) for k in ("psnr", "niqe_out")}
    ok = worst["psnr"] <= PSNR_TOLERANCE and worst["niqe_out"] <= NIQE_TOLERANCE
    lines += ["", f"Per rain type, the means differ by at most {worst['psnr']:.3f} dB PSNR and {worst['niqe_out']:.3f} "
              f"NIQE ({'within' if ok else 'OUTSIDE'} {PSNR_TOLERANCE} dB / {NIQE_TOLERANCE}); a single image by at "
              f"most {image['psnr']:.3f} dB and {image['niqe_out']:.3f}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--test_model", required=True, help="checkpoint file or published name, as for test_model.py")
    p.add_argument("--model_name", default=None, help="backbone (default: the checkpoint's or the name's)")
    p.add_argument("--load_mode", default=None, choices=["normal", "tran"], help="as for test_model.py")
    p.add_argument("--feat_ext", default=None, help="encoder checkpoint for --load_mode tran")
    p.add_argument("--weights_dir", default=None, help="offline folder of the published files")
    p.add_argument("--demo_root", default="demo_data", help="the demo data (built here if absent)")
    p.add_argument("--large_side", type=int, default=1280,
                   help="longer side of the large synthetic pictures (1280: about 1.2 megapixels)")
    p.add_argument("--large_images", type=int, default=4, help="large pictures per rain type (at most 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save_path", default="results/bf16_accuracy", help="where the table goes")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def work() -> int:
        from models.pretrained import choose_checkpoint
        from utils.allocator import keep_freed_memory
        from utils.data.demo import build_demo_data, demo_splits
        from utils.eval.evaluation import load_encoder, load_model
        from utils.eval.precision import cpu_model_name, native_bf16

        keep_freed_memory()
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        choice = choose_checkpoint(args.test_model, args.model_name, args.load_mode)
        path, feat_ext = choice.files(args.feat_ext, args.weights_dir)
        model, ckpt = load_model(choice.model_name, path, choice.load_mode, device)
        encoder = load_encoder(feat_ext, ckpt, path, device) if choice.load_mode == "tran" else None
        if args.large_side < 64:
            raise UserError(f"--large_side must be at least 64, got {args.large_side}")
        demo = demo_splits(build_demo_data(args.demo_root), "test")
        with tempfile.TemporaryDirectory(prefix="coic_bf16_") as tmp:
            large = build_large_set(tmp, args.large_side, args.large_images)
            rows = compare(model, encoder, demo, device, "demo test") + compare(model, encoder, large, device,
                                                                                 f"synthetic {args.large_side}")
        native = "native bf16" if native_bf16() else "NO native bf16 (emulated)"
        header = (f"# bf16 + channels-last vs float32: {args.test_model} ({choice.model_name}, "
                  f"{'CoIC' if choice.load_mode == 'tran' else 'plain'} mode)\n\n{cpu_model_name()}, {native}, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        text = markdown(rows, header)
        os.makedirs(args.save_path, exist_ok=True)
        mode = "coic" if choice.load_mode == "tran" else "plain"
        out = os.path.join(args.save_path, f"{choice.model_name}_{mode}.md")
        with open(out, "w") as f:
            f.write(text)
        print(text + f"\n-> {out}")
        return 0

    return cli_main(work)


if __name__ == "__main__":
    raise SystemExit(main())
