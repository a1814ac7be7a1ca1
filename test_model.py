"""Evaluate a deraining checkpoint (ours or the published code's) on a folder of images.

    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --model_name BRN --load_mode normal
    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --feat_ext ENC.pth --model_name BRN --load_mode tran

``--test_dir`` holds rain/ and norain/ (PSNR/SSIM are computed on Y, as the paper), or just
images (they are derained and saved). Results go to ``--save_path``: the derained PNGs and
``results.csv`` (name, psnr, ssim).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn as nn

from datasets import DataError, find_pairs, is_image, read_image, save_image
from models import available_models, build_encoder, build_model
from utils.checkpoint import CheckpointError, load_weights, read_checkpoint
from utils.inference import image_code, restore
from utils.metrics import psnr, ssim

logger = logging.getLogger("coic.test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Derain a folder with a (CoIC) checkpoint and report PSNR/SSIM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--test_model", required=True, help="backbone checkpoint (ours, or a published state_dict)")
    p.add_argument("--feat_ext", default=None,
                   help="encoder checkpoint for --load_mode tran (default: the encoder inside --test_model, if any)")
    p.add_argument("--model_name", default="BRN", help=f"backbone: {', '.join(available_models())}")
    p.add_argument("--load_mode", default="normal", choices=["normal", "base", "tran"],
                   help="normal/base: no modulation; tran: modulate with z from the encoder")
    p.add_argument("--test_dir", default="datasets/Rain200H/test",
                   help="folder with rain/ and norain/, or a folder of rainy images only")
    p.add_argument("--save_path", default="results", help="where derained images and results.csv go")
    p.add_argument("--tile", type=int, default=None,
                   help="tile images larger than this (default: whole images; IDT always tiles at 128)")
    p.add_argument("--tile_overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels")
    p.add_argument("--use_GPU", action="store_true", help="run on CUDA (cuda:<gpu_id>)")
    p.add_argument("--gpu_id", default="0", help="CUDA device index used with --use_GPU")
    p.add_argument("--device", default=None, help="explicit torch device; overrides --use_GPU")
    p.add_argument("--inter_iter", type=int, default=None, help="override the backbone's recurrent stages")
    return p


def _has_generators(state: dict) -> bool:
    return any(".generator." in k or ".g2pa_wgen." in k for k in state)


def load_model(model_name: str, path: str, mode: str, device: torch.device,
               overrides: Optional[dict] = None) -> tuple[nn.Module, dict]:
    """Build ``model_name`` to fit the checkpoint at ``path`` and load it (eval mode).

    Our checkpoints carry their hyper-parameters; published state_dicts use the reference
    configuration. A state_dict without CoI-M generators (a backbone trained without CoIC in
    its original layout) builds the plain backbone.
    """
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt.get("model_hparams", {})) if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and ckpt.get("model_name") not in (None, model_name):
        raise CheckpointError(f"{path} is a {ckpt['model_name']} checkpoint, not {model_name}; fix --model_name")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(state, dict) and not _has_generators(state):
        if mode == "tran":
            raise CheckpointError(f"{path} has no CoI-M generators (trained without CoIC); use --load_mode normal")
        hparams["dim_in"] = 0
    hparams.update({k: v for k, v in (overrides or {}).items() if v is not None})
    model = build_model(model_name, **hparams)
    load_weights(model, state)
    return model.to(device).eval(), ckpt


def load_encoder(path: Optional[str], model_ckpt: dict, model_path: str, device: torch.device) -> nn.Module:
    if path is None:
        if not (isinstance(model_ckpt, dict) and "encoder" in model_ckpt):
            raise CheckpointError(f"--load_mode tran needs an encoder: {model_path} holds none; pass --feat_ext")
        source, hp = model_ckpt, model_ckpt.get("encoder_hparams", {})
    else:
        source = read_checkpoint(path)
        hp = source.get("encoder_hparams", {}) if isinstance(source, dict) else {}
    encoder = build_encoder(dim=hp.get("dim", 128))
    load_weights(encoder, source, part="encoder")
    return encoder.to(device).eval()


def collect_inputs(test_dir: str) -> list[tuple[str, Optional[str]]]:
    """(rainy path, clean path or None) for a test folder."""
    if not os.path.isdir(test_dir):
        raise DataError(f"--test_dir {test_dir} does not exist")
    if os.path.isdir(os.path.join(test_dir, "rain")) and os.path.isdir(os.path.join(test_dir, "norain")):
        return list(find_pairs(test_dir))
    folder = os.path.join(test_dir, "rain") if os.path.isdir(os.path.join(test_dir, "rain")) else test_dir
    images = sorted(f for f in os.listdir(folder) if is_image(f))
    if not images:
        raise DataError(f"--test_dir {test_dir} holds no images (and no rain/ + norain/ folders)")
    return [(os.path.join(folder, f), None) for f in images]


@torch.no_grad()
def evaluate(model: nn.Module, encoder: Optional[nn.Module], items: list, save_path: Optional[str],
             device: torch.device, tile: Optional[int] = None, overlap: int = 32,
             progress: bool = True) -> list[dict]:
    """Derain each item, save it under ``save_path`` (when given) and score it against its clean image."""
    from tqdm import tqdm

    rows = []
    for rain_path, clean_path in tqdm(items, desc="test", unit="img", disable=not progress, dynamic_ncols=True):
        x = read_image(rain_path).unsqueeze(0).to(device)
        z = image_code(encoder, x) if encoder is not None else None
        y = restore(model, x, z, tile=tile, overlap=overlap)[0].cpu()
        row = {"name": os.path.basename(rain_path), "psnr": None, "ssim": None}
        if clean_path is not None:
            clean = read_image(clean_path)
            if clean.shape != y.shape:
                raise DataError(f"pair sizes differ: {rain_path} vs {clean_path}")
            row["psnr"], row["ssim"] = psnr(y, clean), ssim(y, clean)
        if save_path:
            save_image(y, os.path.join(save_path, os.path.splitext(row["name"])[0] + ".png"))
        rows.append(row)
    return rows


def write_table(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "psnr", "ssim"])
        for r in rows:
            writer.writerow([r["name"], "" if r["psnr"] is None else f"{r['psnr']:.4f}",
                             "" if r["ssim"] is None else f"{r['ssim']:.6f}"])
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device:
        device = torch.device(args.device)
    elif args.use_GPU:
        if not torch.cuda.is_available():
            print("error: --use_GPU was given but CUDA is not available; drop the flag to run on the CPU",
                  file=sys.stderr)
            return 2
        device = torch.device(f"cuda:{int(args.gpu_id)}")
    else:
        device = torch.device("cpu")
    try:
        if args.model_name not in available_models():
            raise ValueError(f"unknown --model_name {args.model_name!r}; choose one of: {', '.join(available_models())}")
        model, ckpt = load_model(args.model_name, args.test_model, args.load_mode, device,
                                 {"inter_iter": args.inter_iter})
        encoder = load_encoder(args.feat_ext, ckpt, args.test_model, device) if args.load_mode == "tran" else None
        items = collect_inputs(args.test_dir)
        os.makedirs(args.save_path, exist_ok=True)
        rows = evaluate(model, encoder, items, args.save_path, device, args.tile, args.tile_overlap)
    except (CheckpointError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_table(rows, os.path.join(args.save_path, "results.csv"))
    scored = [r for r in rows if r["psnr"] is not None]
    print(f"{len(rows)} images from {args.test_dir} -> {args.save_path}")
    if scored:
        print(f"Avg. psnr: {sum(r['psnr'] for r in scored) / len(scored):.4f}")
        print(f"Avg. ssim: {sum(r['ssim'] for r in scored) / len(scored):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
