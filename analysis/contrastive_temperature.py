"""Contrastive temperature sweep: accuracy and PSNR of checkpoints trained at different
temperatures of the contrastive loss (not the CoI-M kernels': see ``modulation_temperature``).

    python -m analysis.contrastive_temperature --test_model T0.1/ckpt.pth T0.5/ckpt.pth T1/ckpt.pth \\
        --data_paths A/test B/test --save_path analysis_results/temperature

For each checkpoint (its temperature read from its saved ``args``/``encoder_hparams``, or given
with ``--temperatures``), on the test pairs of ``--data_paths``:

- contrastive accuracy: the share of queries whose positive key has the largest logit, with the
  exemplars built as in training (query = rainy image resized to the crop, positive = its flip,
  negatives from ``utils.train.exemplars.build_negatives``: one rain-aware, ``--n_neg`` detail-aware);
  also against each kind of negative alone, and the InfoNCE loss. Every checkpoint sees exactly
  the same exemplars (same order, same random draws), so rows differ only by the encoder.
  The argmax does not depend on the temperature; the loss does.
- PSNR/SSIM of the model modulated by z (as ``test_model.py --load_mode tran``), when the
  checkpoint holds a CoIC model.

Writes ``temperature.csv``, ``temperature.md`` (rows sorted by temperature) and ``temperature.png``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from typing import Optional, Sequence


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from analysis.common import (
    AnalysisError,
    add_output_args,
    add_restore_args,
    checkpoint_meta,
    dataset_pairs,
    load_encoder_file,
    markdown_table,
    new_figure,
    resize_square,
    run_tool,
    sample,
    save_figure,
    split_paths,
    write_csv,
    write_text,
)
from utils.cli import Parser, add_alias, add_list
from utils.eval.inference import image_code, restore
from utils.images import read_image
from utils.metrics import psnr, ssim
from utils.train.exemplars import RainArchive, build_negatives

COLUMNS = ["checkpoint", "temperature", "contrastive_acc", "acc_vs_rain_negative", "acc_vs_detail_negatives",
           "contrastive_loss", "psnr", "ssim"]


def contrastive_stats(logits: Tensor) -> dict[str, float]:
    """Sums over a batch of logits (B,1+N): positive at index 0, the rain-aware negative at 1, detail ones after.

    Returns counts (not means) so that batches add up: correct (the positive is the argmax, as
    the training log's contra_acc; a tie goes to the positive, as ``argmax`` picks the first),
    beats_rain (positive >= the rain-aware logit), beats_detail (positive >= every detail-aware
    logit), loss_sum (InfoNCE summed over the batch) and n.
    """
    pos = logits[:, 0]
    return {
        "correct": float((logits.argmax(dim=1) == 0).sum()),
        "beats_rain": float((pos >= logits[:, 1]).sum()),
        "beats_detail": float((pos >= logits[:, 2:].max(dim=1).values).sum()) if logits.shape[1] > 2 else math.nan,
        "loss_sum": float(F.cross_entropy(logits.double(), torch.zeros(len(logits), dtype=torch.long,
                                                                          device=logits.device), reduction="sum")),
        "n": float(logits.shape[0]),
    }


def checkpoint_temperature(obj: object) -> Optional[float]:
    """The contrastive temperature a checkpoint was trained with (saved args first), or None."""
    meta = checkpoint_meta(obj)
    for source in (meta.get("args", {}), meta.get("encoder_hparams", {})):
        if isinstance(source, dict) and source.get("temperature") is not None:
            return float(source["temperature"])
    return None


def exemplar_batches(pairs: Sequence[tuple[str, str]], crop: int, batch_size: int,
                     seed: int) -> list[tuple[Tensor, Tensor]]:
    """(rainy, clean) batches resized to crop x crop, in one shuffled order mixing the datasets.

    Shuffled because training mixes datasets in a batch and the rain-aware negative is searched
    among recent batches; a fixed order sorted by dataset would make it a same-dataset rain.
    """
    order = list(pairs)
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rain = torch.cat([resize_square(read_image(r)[None], crop) for r, _ in chunk])
        clean = torch.cat([resize_square(read_image(c)[None], crop) for _, c in chunk])
        batches.append((rain, clean))
    return batches


@torch.no_grad()
def contrastive_accuracy(encoder: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], n_neg: int,
                         temperature: float, seed: int, device: torch.device) -> dict[str, float]:
    """Accuracies and mean InfoNCE loss of ``encoder`` over the exemplar batches (eval mode, no update)."""
    encoder.temperature = temperature
    # momentum 1 turns ContrastiveEncoder.contrast's MoCo update into an identity, so the key encoder
    # is the checkpoint's for every batch.
    momentum, encoder.momentum = encoder.momentum, 1.0
    archive = RainArchive.for_batch_size(max(len(b[0]) for b in batches))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    total: dict[str, float] = {}
    try:
        for rain, clean in batches:
            query, query_clean = rain.to(device), clean.to(device)
            positive, negatives = build_negatives(query, query_clean, archive, n_neg, generator)
            logits, _ = encoder.contrast(query, positive, negatives)
            for k, v in contrastive_stats(logits).items():
                total[k] = total.get(k, 0.0) + v
    finally:
        encoder.momentum = momentum
    n = total["n"]
    return {"contrastive_acc": total["correct"] / n, "acc_vs_rain_negative": total["beats_rain"] / n,
            "acc_vs_detail_negatives": total["beats_detail"] / n, "contrastive_loss": total["loss_sum"] / n}


def plot(rows: Sequence[dict], path: str) -> None:
    temps = [r["temperature"] for r in rows]
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot()
    ax.plot(temps, [r["contrastive_acc"] for r in rows], "o-", color="tab:blue", label="contrastive accuracy")
    ax.set_xlabel("temperature")
    ax.set_ylabel("contrastive accuracy", color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    if len(set(temps)) > 1 and min(temps) > 0 and max(temps) / min(temps) >= 10:
        ax.set_xscale("log")
    if any(r["psnr"] is not None for r in rows):
        ax2 = ax.twinx()
        pts = [(r["temperature"], r["psnr"]) for r in rows if r["psnr"] is not None]
        ax2.plot([t for t, _ in pts], [p for _, p in pts], "s--", color="tab:red", label="PSNR")
        ax2.set_ylabel("PSNR (dB)", color="tab:red")
    ax.set_title("temperature sweep")
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Contrastive accuracy and PSNR of checkpoints trained with different temperatures, "
                           "in one table.")
    add_list(p, "--test_model", required=True, metavar="PATH",
             help="our ckpt_*.pth files (or published MoCo encoder state_dicts, with --temperatures), space- or "
                  "comma-separated")
    add_alias(p, "--checkpoints", "--test_model")
    add_list(p, "--temperatures", type=float, default=None, metavar="T",
             help="one temperature per checkpoint (default: read from each checkpoint)")
    add_list(p, "--data_paths", required=True, metavar="PATH",
             help="test folders with rain/ and norain/ (space- or comma-separated)")
    p.add_argument("--num_images", type=int, default=0, help="pairs per dataset, drawn with --seed (0: all)")
    p.add_argument("--crop_size", type=int, default=None,
                   help="exemplar size (default: the first checkpoint's training crop, else 128)")
    p.add_argument("--n_neg", type=int, default=None,
                   help="detail-aware negatives per query (default: the first checkpoint's, else 4)")
    p.add_argument("--batch_size", type=int, default=8, help="queries per batch (the rain archive holds 64/batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair draw, order and exemplar randomness")
    p.add_argument("--no_psnr", action="store_true", help="skip the restoration (contrastive accuracy only)")
    add_restore_args(p)
    add_output_args(p, "analysis_results/temperature")
    return p


def run(args: argparse.Namespace, device: torch.device) -> str:
    from tqdm import tqdm

    from utils.eval.evaluation import load_model

    if args.temperatures is not None and len(args.temperatures) != len(args.test_model):
        raise AnalysisError(f"--temperatures gives {len(args.temperatures)} values "
                            f"for {len(args.test_model)} checkpoints")
    pairs = [pair for p in split_paths(args.data_paths) for pair in sample(dataset_pairs(p), args.num_images,
                                                                           args.seed)]
    # Keep each encoder and what its checkpoint says about itself, not the whole file (optimiser states).
    runs = []
    for i, path in enumerate(args.test_model):
        encoder, obj = load_encoder_file(path, device)
        temperature = args.temperatures[i] if args.temperatures else checkpoint_temperature(obj)
        if temperature is None:
            raise AnalysisError(f"{path} does not record its temperature; pass --temperatures")
        meta = checkpoint_meta(obj)
        runs.append({"path": path, "encoder": encoder, "temperature": temperature, "args": meta.get("args", {}),
                     "model_name": meta.get("model_name", args.model_name),
                     "psnr": not args.no_psnr and isinstance(obj, dict) and "model" in obj})
        del obj
    crop = args.crop_size or runs[0]["args"].get("crop_size") or 128
    n_neg = args.n_neg or runs[0]["args"].get("n_neg") or 4
    batches = exemplar_batches(pairs, crop, args.batch_size, args.seed)
    rows = []
    work_units = len(runs) * len(batches) + sum(r["psnr"] for r in runs) * len(pairs)
    with tqdm(total=work_units, desc="temperature sweep", dynamic_ncols=True) as bar:
        for run in runs:
            name = os.path.basename(run["path"])
            bar.set_postfix_str(f"{name}: contrast")
            row = {"checkpoint": run["path"], "temperature": run["temperature"], "psnr": None, "ssim": None}
            row.update(contrastive_accuracy(run["encoder"], batches, n_neg, run["temperature"], args.seed, device))
            bar.update(len(batches))
            if run["psnr"]:
                bar.set_postfix_str(f"{name}: PSNR")
                model, _ = load_model(run["model_name"], run["path"], "tran", device)
                scores = []
                for rain_path, clean_path in pairs:
                    rainy, clean = read_image(rain_path)[None].to(device), read_image(clean_path)[None].to(device)
                    code = image_code(run["encoder"], rainy)
                    out = restore(model, rainy, code, args.tile, args.tile_overlap)
                    scores.append((psnr(out, clean), ssim(out, clean)))
                    bar.update(1)
                row["psnr"] = sum(s[0] for s in scores) / len(scores)
                row["ssim"] = sum(s[1] for s in scores) / len(scores)
                del model
            rows.append(row)
    rows.sort(key=lambda r: r["temperature"])
    os.makedirs(args.save_path, exist_ok=True)
    write_csv(os.path.join(args.save_path, "temperature.csv"), COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    md = markdown_table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    write_text(os.path.join(args.save_path, "temperature.md"),
               f"{len(pairs)} test pairs; exemplars {crop}x{crop}, 1 rain-aware + {n_neg} detail-aware negatives "
               f"per query, batches of {args.batch_size}, seed {args.seed}\n\n" + md)
    plot(rows, os.path.join(args.save_path, "temperature.png"))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
