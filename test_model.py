"""Evaluate a deraining checkpoint (ours or the published code's) on one folder or the paper's test sets.

    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --model_name BRN --load_mode normal
    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --feat_ext ENC.pth --model_name BRN --load_mode tran
    python test_model.py --test_model MODEL.pth --load_mode tran --testset Rain200L,Rain200H,Rain800,DID,DDN,SPA

``--test_dir`` holds a pair layout of ``datasets.scan_folder`` (rain/ + norain/, SPA's rain/ +
gt/) and is scored, or just images (they are derained and saved). Results go to
``--save_path``: the derained PNGs and ``results.csv`` (name, psnr, ssim, protocol).

``--testset A,B,...`` evaluates each named set under ``--data_root`` (layouts in
``datasets.DATASET_SPECS``; DID and Rain800 test folders may still be stacked) into
``--save_path/<Name>/`` and writes the paper-style table, mean over the scored sets, as
``summary.csv`` and ``summary.md``. PSNR/SSIM follow ``--metric_protocol`` (``utils.metrics``);
the protocol is written into every result file.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from datasets import (DATASET_SPECS, DataError, dataset_spec, find_dataset_folder, find_pairs, is_image, read_image,
                      read_pair, save_image)
from models import available_models, build_encoder, build_model
from utils.checkpoint import CheckpointError, load_weights, read_checkpoint
from utils.distributed import resolve_device
from utils.errors import UserError, cli_main
from utils.io import atomic_write_text
from utils.inference import AMP_DTYPES, image_code, restore
from utils.metrics import PROTOCOLS, score

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
    p.add_argument("--testset", default=None,
                   help="comma-separated test sets under --data_root (" + ", ".join(s.name for s in DATASET_SPECS)
                   + "); replaces --test_dir")
    p.add_argument("--data_root", default="datasets", help="folder holding the datasets, for --testset")
    p.add_argument("--metric_protocol", default="coic", choices=list(PROTOCOLS),
                   help="coic: the paper's Python metrics; matlab: Restormer/DRSformer evaluate_PSNR_SSIM.m "
                        "(Rain200L/H, SPA); matlab-ddn: DID/DDN statistic.m")
    p.add_argument("--skip_existing", action="store_true",
                   help="skip images whose derained PNG exists, reusing their scores from results.csv when present")
    p.add_argument("--save_path", default="results", help="where derained images and results.csv go")
    p.add_argument("--tile", type=int, default=None,
                   help="tile images larger than this (default: whole images; IDT always tiles at 128)")
    p.add_argument("--tile_overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels")
    p.add_argument("--use_GPU", action="store_true", help="run on CUDA (cuda:<gpu_id>)")
    p.add_argument("--gpu_id", default="0", help="CUDA device index used with --use_GPU")
    p.add_argument("--device", default=None, help="explicit torch device; overrides --use_GPU")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="autocast the model and encoder to bf16/fp16 (faster on recent GPUs; scores use float32)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster convs on GPUs)")
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


def collect_inputs(test_dir: str, stacked_rain_half: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
    """(rainy path, clean path or None) for a test folder: scored pairs, or rainy images only.

    A folder with a pair layout (rain/ + norain/, SPA's rain/ + gt/) is paired; a folder of
    side-by-side images is paired when ``stacked_rain_half`` names its rainy half; otherwise
    the images of ``rain/`` (or of the folder itself) are derained without ground truth.
    """
    if not os.path.isdir(test_dir):
        raise DataError(f"--test_dir {test_dir} does not exist")
    rain_dir = os.path.join(test_dir, "rain")
    paired = any(os.path.isdir(os.path.join(test_dir, d)) for d in ("norain", "gt", "real_world"))
    if paired or (stacked_rain_half and not os.path.isdir(rain_dir) and _images(test_dir)):
        return list(find_pairs(test_dir, stacked_rain_half))
    folder = rain_dir if os.path.isdir(rain_dir) else test_dir
    images = _images(folder)
    if not images:
        raise DataError(f"--test_dir {test_dir} holds no images (and no rain/ + norain/ folders)")
    return [(os.path.join(folder, f), None) for f in images]


def _images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if is_image(f))


def collect_testset(name: str, data_root: str) -> tuple[str, str, list[tuple[str, Optional[str]]]]:
    """(canonical name, test folder, items) of a named test set under ``data_root``."""
    spec = dataset_spec(name)
    folder = find_dataset_folder(data_root, spec)
    if folder is None:
        raise DataError(f"--testset {name}: no {' or '.join(spec.folders)} folder in --data_root {data_root}")
    test_dir = os.path.join(folder, spec.splits["test"]) if spec.splits["test"] else folder
    if not os.path.isdir(test_dir):
        raise DataError(f"--testset {name}: test folder {test_dir} does not exist")
    if not spec.ground_truth:
        for sub in ("rain", "Real_Internet"):  # RealInt: the images, or a sub-folder of them
            if not _images(test_dir) and os.path.isdir(os.path.join(test_dir, sub)):
                test_dir = os.path.join(test_dir, sub)
        images = _images(test_dir)
        if not images:
            raise DataError(f"--testset {name}: {test_dir} holds no images")
        return spec.name, test_dir, [(os.path.join(test_dir, f), None) for f in images]
    return spec.name, test_dir, collect_inputs(test_dir, spec.stacked_rain_half)


def output_name(rain_path: str) -> str:
    """File name of the derained image of ``rain_path``: its stem as PNG."""
    return os.path.splitext(os.path.basename(rain_path))[0] + ".png"


def read_table(path: str) -> dict[str, dict]:
    """Rows of an existing results.csv by image name, scores as floats ({} when absent or unreadable)."""
    if not os.path.isfile(path):
        return {}
    rows = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                scores = [float(row[k]) if row.get(k) else None for k in ("psnr", "ssim")]
                rows[row["name"]] = {"name": row["name"], "psnr": scores[0], "ssim": scores[1],
                                     "protocol": row.get("protocol") or "coic"}
    except (OSError, csv.Error, KeyError, TypeError, ValueError):
        logger.warning("ignoring unreadable results file %s", path)
        return {}
    return rows


def _read_item(rain_path: str, clean_path: Optional[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if clean_path is not None:
        return read_pair(rain_path, clean_path)
    return read_image(rain_path), None


@torch.no_grad()
def evaluate(model: nn.Module, encoder: Optional[nn.Module], items: list, save_path: Optional[str],
             device: torch.device, tile: Optional[int] = None, overlap: int = 32,
             progress: bool = True, protocol: str = "coic", skip_existing: bool = False,
             table_path: Optional[str] = None, desc: str = "test", amp: Optional[torch.dtype] = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> list[dict]:
    """Derain each (rain, clean or None) item, save it under ``save_path`` and score it.

    The next image is decoded and the previous PNGs are encoded in a background thread while
    the model runs, so at most a few images are in memory. ``amp``: autocast dtype of the
    model and encoder (scores are computed on the float32 output). ``skip_existing``: an item
    whose PNG already exists is not derained again; its scores come from the rows of
    ``table_path`` scored with the same protocol, else from the saved PNG. ``table_path`` is
    also rewritten (atomically) every 50 images, so an interrupted run loses little.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    previous = read_table(table_path) if (skip_existing and table_path) else {}
    out_paths = [os.path.join(save_path, output_name(r)) if save_path else None for r, _ in items]
    todo = [i for i, out in enumerate(out_paths) if not (skip_existing and out and os.path.isfile(out))]
    next_todo = dict(zip(todo, todo[1:]))
    rows, skipped, rescored = [], 0, 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="coic-io") as io_pool:
        reads = {i: io_pool.submit(_read_item, *items[i]) for i in todo[:1]}
        writes: deque = deque()
        for k, (rain_path, clean_path) in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress,
                                                         dynamic_ncols=True)):
            name, out_path = output_name(rain_path), out_paths[k]
            row = {"name": name, "psnr": None, "ssim": None, "protocol": protocol}
            if k not in reads:
                skipped += 1
                old = previous.get(name)
                if clean_path is None:
                    pass
                elif old is not None and old["protocol"] == protocol and old["psnr"] is not None:
                    row["psnr"], row["ssim"] = old["psnr"], old["ssim"]
                else:  # no score on record for this protocol: score the saved 8-bit PNG
                    rescored += 1
                    y, clean = read_image(out_path), read_image(clean_path)
                    _check_sizes(y, clean, out_path, clean_path)
                    row["psnr"], row["ssim"] = score(y, clean, protocol)
            else:
                x, clean = reads.pop(k).result()
                following = next_todo.get(k)
                if following is not None:  # decode the next image while this one is derained
                    reads[following] = io_pool.submit(_read_item, *items[following])
                x = x.unsqueeze(0).to(device).contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    z = image_code(encoder, x) if encoder is not None else None
                    y = restore(model, x, z, tile=tile, overlap=overlap)
                y = y[0].float().cpu()
                if clean is not None:
                    _check_sizes(y, clean, rain_path, clean_path)
                    row["psnr"], row["ssim"] = score(y, clean, protocol)
                if out_path:
                    writes.append(io_pool.submit(save_image, y, out_path))
                while writes and (writes[0].done() or len(writes) > 2):
                    writes.popleft().result()  # a failed write stops the run here
            rows.append(row)
            if table_path and len(rows) % 50 == 0:
                # keep the earlier run's rows not reached yet, so an interruption loses no score
                done = {r["name"] for r in rows}
                write_table(rows + [r for n, r in previous.items() if n not in done], table_path)
        while writes:
            writes.popleft().result()
    if skipped:
        logger.info("%s: %d images already derained, skipped (%d re-scored from their saved PNGs)", desc, skipped,
                    rescored)
    if table_path:
        write_table(rows, table_path)
    return rows


def _check_sizes(y: torch.Tensor, clean: torch.Tensor, rain_path: str, clean_path: str) -> None:
    if clean.shape != y.shape:
        raise DataError(f"pair sizes differ: {rain_path} gives {tuple(y.shape[1:])}, "
                        f"{clean_path} is {tuple(clean.shape[1:])}")


def _fmt(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_table(rows: list[dict], path: str) -> None:
    """Per-image results as CSV (name, psnr, ssim, protocol), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "psnr", "ssim", "protocol"])
    for r in rows:
        writer.writerow([r["name"], _fmt(r["psnr"], 4), _fmt(r["ssim"], 6), r.get("protocol", "coic")])
    atomic_write_text(path, buf.getvalue())


def summarize(name: str, rows: list[dict]) -> dict:
    """One line of the summary table: the set's mean PSNR/SSIM over its scored images."""
    scored = [r for r in rows if r["psnr"] is not None]
    return {"dataset": name, "images": len(rows), "scored": len(scored),
            "psnr": sum(r["psnr"] for r in scored) / len(scored) if scored else None,
            "ssim": sum(r["ssim"] for r in scored) / len(scored) if scored else None}


def with_mean(summary: list[dict]) -> list[dict]:
    """The summary plus the paper's "mean" line: the unweighted mean of the scored sets' means."""
    scored = [s for s in summary if s["psnr"] is not None]
    if len(scored) < 2:
        return list(summary)
    mean = {"dataset": "Mean", "images": sum(s["images"] for s in scored), "scored": sum(s["scored"] for s in scored),
            "psnr": sum(s["psnr"] for s in scored) / len(scored), "ssim": sum(s["ssim"] for s in scored) / len(scored)}
    return list(summary) + [mean]


def format_markdown(summary: list[dict], protocol: str) -> str:
    """The paper-style table (Markdown): one line per test set and the mean."""
    lines = [f"Metric protocol: `{protocol}` ({PROTOCOLS[protocol].description})", "",
             "| Dataset | Images | PSNR | SSIM |", "|---|---:|---:|---:|"]
    for s in summary:
        psnr = "—" if s["psnr"] is None else f"{s['psnr']:.2f}"
        ssim = "—" if s["ssim"] is None else f"{s['ssim']:.4f}"
        lines.append(f"| {s['dataset']} | {s['images']} | {psnr} | {ssim} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: list[dict], save_path: str, protocol: str) -> None:
    """``summary.csv`` and ``summary.md`` in ``save_path``, each written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "images", "psnr", "ssim", "protocol"])
    for s in summary:
        writer.writerow([s["dataset"], s["images"], _fmt(s["psnr"], 4), _fmt(s["ssim"], 6), protocol])
    atomic_write_text(os.path.join(save_path, "summary.csv"), buf.getvalue())
    atomic_write_text(os.path.join(save_path, "summary.md"), format_markdown(summary, protocol))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Evaluate as the flags say; prints the per-folder lines and the summary."""
    device = resolve_device(args)
    if args.model_name not in available_models():
        raise UserError(f"unknown --model_name {args.model_name!r}; choose one of: {', '.join(available_models())}")
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be a positive number of pixels, got {args.tile}; "
                        "leave --tile out to derain whole images")
    # Resolve the inputs before loading the model: a typo in a path fails at once.
    if args.testset:
        names = [n.strip() for n in args.testset.split(",") if n.strip()]
        if not names:
            raise DataError("--testset is empty; pass names such as Rain200L,Rain200H,SPA")
        sets = [collect_testset(n, args.data_root) for n in names]
    else:
        sets = [(None, args.test_dir, collect_inputs(args.test_dir))]
    model, ckpt = load_model(args.model_name, args.test_model, args.load_mode, device,
                             {"inter_iter": args.inter_iter})
    encoder = load_encoder(args.feat_ext, ckpt, args.test_model, device) if args.load_mode == "tran" else None
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    amp = AMP_DTYPES[args.amp]
    summary = []
    for name, folder, items in sets:
        out = os.path.join(args.save_path, name) if name else args.save_path
        os.makedirs(out, exist_ok=True)
        rows = evaluate(model, encoder, items, out, device, args.tile, args.tile_overlap,
                        protocol=args.metric_protocol, skip_existing=args.skip_existing,
                        table_path=os.path.join(out, "results.csv"), desc=name or "test", amp=amp,
                        memory_format=memory_format)
        summary.append(summarize(name or folder, rows))
        print(f"{len(rows)} images from {folder} -> {out}")
    if args.testset:
        table = with_mean(summary)
        write_summary(table, args.save_path, args.metric_protocol)
        print(format_markdown(table, args.metric_protocol))
    elif summary[0]["psnr"] is not None:
        print(f"Avg. psnr: {summary[0]['psnr']:.4f}  ({args.metric_protocol} protocol)")
        print(f"Avg. ssim: {summary[0]['ssim']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
