"""Rain vs detail: how far z moves when the rain, or the background detail, is taken away.

    python -m analysis.rain_detail --feat_ext CKPT --data_paths A/test B/test \\
        [--coic_model COIC.pth --base_model BASE.pth] --save_path analysis_results/rain_detail

For every test pair (rainy R, clean C) and the clean image blurred, B = blur(C) (Gaussian,
σ = ``--blur_sigma`` at the encoder's 128x128 input, the scale at which training blurs its
detail-aware negatives):

- rain shift   = 1 - cos(z(R), z(C))   (what removing the rain does to z),
- detail shift = 1 - cos(z(C), z(B))   (what removing the detail does to z),

both in [0, 2]. With ``--coic_model`` (a CoIC checkpoint, run modulated by its own encoder) and
``--base_model`` (the same backbone without CoIC; passing the CoIC checkpoint again runs it
unmodulated), each pair also gets both PSNRs and the gain, and every dataset gets the Pearson
correlation of the gain with each shift: does CoIC help most where the rain (or detail) moves
z most?

Writes ``rain_detail_pairs.csv`` (one row per pair), ``rain_detail.csv``/``rain_detail.md``
(one row per dataset and one for all) and ``rain_detail.png``.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence


import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.common import (
    AnalysisError,
    add_output_args,
    add_restore_args,
    check_labels,
    dataset_colours,
    dataset_pairs,
    encode_batch,
    load_encoder_file,
    markdown_table,
    new_figure,
    pearson,
    resize_square,
    run_tool,
    sample,
    save_figure,
    split_paths,
    write_csv,
    write_text,
)
from utils.checkpoint import read_checkpoint
from utils.cli import Parser, add_alias, add_list
from utils.errors import DataError
from utils.eval.inference import ENCODER_SIZE, image_code, restore
from utils.images import read_image
from utils.metrics import psnr
from utils.train.exemplars import gaussian_blur

PAIR_COLUMNS = ["dataset", "image", "rain_shift", "detail_shift", "psnr_base", "psnr_coic", "psnr_gain"]


def z_shift(a: Tensor, b: Tensor) -> Tensor:
    """Cosine distance 1 - cos(a_i, b_i) row by row: a, b (N,D) -> (N,) float64 in [0, 2]."""
    return 1.0 - F.cosine_similarity(a.to(torch.float64), b.to(torch.float64), dim=-1)


@torch.no_grad()
def pair_codes(encoder: torch.nn.Module, rainy: Tensor, clean: Tensor, sigma: float) -> Tensor:
    """z (3,D) of the rainy image, the clean one and the blurred clean one; images (1,3,H,W) in [0,1]."""
    small_rain, small_clean = resize_square(rainy, ENCODER_SIZE), resize_square(clean, ENCODER_SIZE)
    blurred = gaussian_blur(small_clean, torch.tensor([sigma], device=clean.device))
    return encode_batch(encoder, torch.cat([small_rain, small_clean, blurred]))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n-1); nan below two values."""
    if len(values) < 2:
        return math.nan
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One summary per dataset (in order of appearance) and one for all rows ("all").

    rows: dicts with dataset, rain_shift, detail_shift and, when models were given,
    psnr_base, psnr_coic, psnr_gain. Means, sample stds, and Pearson r of the gain with each shift.
    """
    groups = {name: [r for r in rows if r["dataset"] == name] for name in dict.fromkeys(r["dataset"] for r in rows)}
    if len(groups) > 1:
        groups["all"] = list(rows)
    out = []
    for name, group in groups.items():
        rain = [r["rain_shift"] for r in group]
        detail = [r["detail_shift"] for r in group]
        s = {"dataset": name, "n": len(group), "rain_shift_mean": _mean(rain), "rain_shift_std": _std(rain),
             "detail_shift_mean": _mean(detail), "detail_shift_std": _std(detail)}
        if group and group[0].get("psnr_gain") is not None:
            gain = [r["psnr_gain"] for r in group]
            s.update(psnr_base=_mean([r["psnr_base"] for r in group]), psnr_coic=_mean([r["psnr_coic"] for r in group]),
                     psnr_gain=_mean(gain), r_gain_rain=pearson(gain, rain), r_gain_detail=pearson(gain, detail))
        out.append(s)
    return out


def plot(rows: Sequence[dict], path: str) -> None:
    """Rain shift vs detail shift per pair; with models, PSNR gain vs rain shift beside it."""
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    with_gain = rows[0].get("psnr_gain") is not None
    fig = new_figure(12.5 if with_gain else 7.0, 5.0)
    axes = fig.subplots(1, 2 if with_gain else 1, squeeze=False)[0]
    for name, colour in zip(names, dataset_colours(len(names))):
        group = [r for r in rows if r["dataset"] == name]
        axes[0].scatter([r["rain_shift"] for r in group], [r["detail_shift"] for r in group], s=20, color=colour,
                        label=name, alpha=0.85, edgecolors="none")
        if with_gain:
            axes[1].scatter([r["rain_shift"] for r in group], [r["psnr_gain"] for r in group], s=20, color=colour,
                            label=name, alpha=0.85, edgecolors="none")
    axes[0].set_xlabel("rain shift 1 - cos(z(rainy), z(clean))")
    axes[0].set_ylabel("detail shift 1 - cos(z(clean), z(blurred clean))")
    axes[0].set_title("what moves z: rain vs detail")
    if with_gain:
        axes[1].axhline(0.0, color="grey", lw=0.8)
        axes[1].set_xlabel("rain shift")
        axes[1].set_ylabel("PSNR gain of CoIC (dB)")
        axes[1].set_title("CoIC's gain vs rain shift")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    save_figure(fig, path)


def _load_models(args: argparse.Namespace, device: torch.device):
    """(coic model, its encoder, base model), or Nones when no checkpoints were given."""
    if args.coic_model is None and args.base_model is None:
        return None, None, None
    if args.coic_model is None or args.base_model is None:
        raise AnalysisError("the PSNR gain needs both --coic_model and --base_model (or neither)")
    from utils.eval.evaluation import load_encoder, load_model

    models = []
    for path, mode in ((args.coic_model, "tran"), (args.base_model, "normal")):
        ckpt = read_checkpoint(path)
        name = ckpt.get("model_name", args.model_name) if isinstance(ckpt, dict) else args.model_name
        del ckpt  # load_model reads it again; do not hold two copies of a large file
        models.append(load_model(name, path, mode, device))
    (coic, coic_ckpt), (base, _) = models
    return coic, load_encoder(None, coic_ckpt, args.coic_model, device), base


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="How far the code z moves when rain or detail is removed, per dataset, and how that "
                           "relates to CoIC's PSNR gain.")
    p.add_argument("--feat_ext", default=None,
                   help="encoder checkpoint (ours or a published MoCo state_dict); default: the one in --coic_model")
    add_alias(p, "--encoder", "--feat_ext")
    add_list(p, "--data_paths", required=True, metavar="PATH",
             help="test folders with rain/ and norain/ (space- or comma-separated)")
    add_list(p, "--labels", default=None, metavar="NAME", help="a name per data path")
    p.add_argument("--num_images", type=int, default=0, help="pairs per dataset, drawn with --seed (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair draw")
    p.add_argument("--blur_sigma", type=float, default=1.5,
                   help="σ of the detail-removing blur at 128x128 (training draws σ in [0.3, 1.5])")
    g = p.add_argument_group("PSNR gain (optional)")
    g.add_argument("--coic_model", default=None, help="CoIC checkpoint, evaluated modulated by its encoder")
    g.add_argument("--base_model", default=None,
                   help="the backbone without CoIC (or the CoIC checkpoint again: evaluated without modulation)")
    add_restore_args(g)
    add_output_args(p, "analysis_results/rain_detail")
    return p


def run(args: argparse.Namespace, device: torch.device) -> str:
    from tqdm import tqdm

    if args.blur_sigma <= 0:
        raise AnalysisError(f"--blur_sigma must be positive, got {args.blur_sigma}")
    paths = split_paths(args.data_paths)
    labels = check_labels(args.labels, paths)
    pairs = [sample(dataset_pairs(p), args.num_images, args.seed) for p in paths]
    coic, coic_encoder, base = _load_models(args, device)
    if args.feat_ext is None and coic_encoder is None:
        raise AnalysisError("give --feat_ext, or --coic_model (its encoder is used)")
    encoder = load_encoder_file(args.feat_ext, device)[0] if args.feat_ext else coic_encoder
    rows = []
    with tqdm(total=sum(map(len, pairs)), desc="rain vs detail", unit="pair", dynamic_ncols=True) as bar:
        for label, items in zip(labels, pairs):
            for rain_path, clean_path in items:
                rainy, clean = read_image(rain_path)[None].to(device), read_image(clean_path)[None].to(device)
                if rainy.shape != clean.shape:
                    raise DataError(f"pair sizes differ: {rain_path} vs {clean_path}")
                z = pair_codes(encoder, rainy, clean, args.blur_sigma)
                row = {"dataset": label, "image": os.path.basename(rain_path),
                       "rain_shift": float(z_shift(z[0:1], z[1:2])), "detail_shift": float(z_shift(z[1:2], z[2:3])),
                       "psnr_base": None, "psnr_coic": None, "psnr_gain": None}
                if coic is not None:
                    # z(rainy) above is the same computation when the encoder is the model's own
                    code = z[0:1] if encoder is coic_encoder else image_code(coic_encoder, rainy)
                    row["psnr_coic"] = psnr(restore(coic, rainy, code, args.tile, args.tile_overlap), clean)
                    row["psnr_base"] = psnr(restore(base, rainy, None, args.tile, args.tile_overlap), clean)
                    row["psnr_gain"] = row["psnr_coic"] - row["psnr_base"]
                rows.append(row)
                bar.update(1)
    os.makedirs(args.save_path, exist_ok=True)
    columns = PAIR_COLUMNS if coic is not None else PAIR_COLUMNS[:4]
    write_csv(os.path.join(args.save_path, "rain_detail_pairs.csv"), columns,
              [[r[c] for c in columns] for r in rows])
    summary = summarize(rows)
    keys = list(summary[0])
    write_csv(os.path.join(args.save_path, "rain_detail.csv"), keys, [[s[k] for k in keys] for s in summary])
    md = markdown_table(keys, [[s[k] for k in keys] for s in summary])
    note = ("rain shift = 1 - cos(z(rainy), z(clean)); detail shift = 1 - cos(z(clean), z(blurred clean)), "
            f"σ = {args.blur_sigma} at 128x128")
    if coic is not None:
        note += "; r_gain_*: Pearson r of the per-image PSNR gain (CoIC - base) with each shift"
    write_text(os.path.join(args.save_path, "rain_detail.md"), note + "\n\n" + md)
    plot(rows, os.path.join(args.save_path, "rain_detail.png"))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
