"""Evaluate a deraining checkpoint (ours or the published code's) on one folder or the paper's test sets.

    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --model_name BRN --load_mode normal
    python test_model.py --use_GPU --gpu_id 0 --test_model MODEL.pth --feat_ext ENC.pth --model_name BRN --load_mode tran
    python test_model.py --test_model MODEL.pth --load_mode tran --testset Rain200L,Rain200H,Rain800,DID,DDN,SPA
    python test_model.py --test_model coic-brn --test_dir DIR   # a published name (--list_models), downloaded once
    python test_model.py --test_model coic-brn --test_dir photo.jpg 'more/*.png'

``--test_dir`` holds a pair layout of ``utils.data.layouts`` (rain/ + norain/, SPA's rain/ +
gt/) and is scored, or just images (they are derained and saved); it may also name photos and
glob patterns. An unreadable image is listed, not fatal (``--strict`` stops at it). Results go to
``--save_path``: the derained PNGs, ``results.csv`` (name, psnr, ssim, protocol) and the
report page ``index.html`` (``utils.eval.report``: before/after sliders, previews under ``report/``).

``--testset A,B,...`` evaluates each named set under ``--data_root`` (layouts in
``utils.data.specs``; DID and Rain800 test folders may still be stacked) into
``--save_path/<Name>/`` and writes the paper-style table, mean over the scored sets, as
``summary.csv`` and ``summary.md``. PSNR/SSIM follow ``--metric_protocol`` (``utils.metrics``);
the protocol is written into every result file.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

import torch

from models import available_models
from models.pretrained import WEIGHTS_DIR_ENV, choose_checkpoint, describe_published, published_names
from utils.allocator import keep_freed_memory
from utils.checkpoint import trusted_checkpoints
from utils.cli import Parser, add_alias, add_device_args, add_list, add_precision_args
from utils.data.specs import DATASET_SPECS
from utils.errors import DataError, UserError, cli_main
from utils.eval.evaluation import (  # noqa: F401
    collect_inputs,
    collect_test_inputs,
    collect_testset,
    evaluate,
    load_encoder,
    load_model,
    output_name,
)
from utils.eval.inference import AMP_DTYPES, image_code
from utils.eval.memory import default_budget, format_size, parse_size
from utils.eval.precision import setting_from_flags
from utils.eval.report import ReportColumn, ReportSet, run_description, write_report
from utils.eval.results import format_markdown, protocol_notes, summarize, with_mean, write_summary
from utils.metrics import METRICS, PROTOCOLS, parse_metrics
from utils.train.distributed import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Derain a folder with a (CoIC) checkpoint and report PSNR/SSIM.")
    g = p.add_argument_group("input")
    add_list(g, "--test_dir", default=["datasets/Rain200H/test"], metavar="PATH",
             help="folder with rain/ and norain/, a folder of rainy images, or rainy photos and glob patterns "
                  "('photos/*.jpg'); space- or comma-separated (default: datasets/Rain200H/test)")
    add_list(g, "--testset", default=None, metavar="NAME",
             help="test sets under --data_root (" + ", ".join(s.name for s in DATASET_SPECS)
             + "), space- or comma-separated; replaces --test_dir")
    g.add_argument("--data_root", default="datasets", help="folder holding the datasets, for --testset")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: derain the others, list it at the end and in "
                        "results.csv, exit 2)")
    g = p.add_argument_group("model")
    g.add_argument("--test_model", default=None,
                   help="backbone checkpoint (ours, or a published state_dict), or a published name, downloaded once: "
                   + ", ".join(published_names()) + " (--list_models)")
    add_alias(g, "--checkpoint", "--test_model")
    g.add_argument("--list_models", action="store_true", help="list the published names and whether they are cached")
    g.add_argument("--weights_dir", default=None,
                   help=f"offline: take the published files from this folder (else ${WEIGHTS_DIR_ENV}), never download")
    g.add_argument("--feat_ext", default=None,
                   help="encoder checkpoint for --load_mode tran (default: the encoder inside --test_model, or the "
                        "published name's)")
    add_alias(g, "--encoder", "--feat_ext")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load a --test_model/--feat_ext file that holds objects beyond tensors with the full unpickler, "
                        "which runs any code it names: only for files from a source you trust")
    g.add_argument("--model_name", default=None,
                   help=f"backbone: {', '.join(available_models())} (default: a published name's, a checkpoint's own, else BRN)")
    g.add_argument("--load_mode", default=None, choices=["normal", "base", "tran"],
                   help="normal/base: no modulation; tran: modulate with z from the encoder "
                        "(default: tran for a coic-* name, else normal)")
    g.add_argument("--inter_iter", type=int, default=None, help="override the backbone's recurrent stages")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="results", help="where derained images and results.csv go")
    add_alias(g, "--out", "--save_path")
    g.add_argument("--metric_protocol", default="coic", choices=list(PROTOCOLS),
                   help="coic: the paper's Python metrics (the default, as the paper's tables were computed); "
                        "matlab: Restormer/DRSformer evaluate_PSNR_SSIM.m (Rain200L/H, SPA); matlab-ddn: DID/DDN "
                        "statistic.m")
    add_list(g, "--metrics", default=None, metavar="NAME",
             help="scores, space- or comma-separated: " + ", ".join(f"{m.name} ({m.description})" for m in METRICS.values())
             + ". Default: psnr,ssim where there is ground truth, niqe where there is none")
    g.add_argument("--niqe_channel", default="y", choices=["y", "gray"],
                   help="NIQE on MATLAB's rgb2ycbcr Y (niqe_release) or on 0.299R+0.587G+0.114B (pyiqa's default, "
                        "the published eval_niqe.py)")
    g.add_argument("--skip_existing", action="store_true",
                   help="skip images whose derained PNG exists, reusing their scores from results.csv when present")
    g = p.add_argument_group("speed")
    add_precision_args(g, "auto (the default): bf16 on a CPU with native bf16 where the backbone's mode is shown accurate in it "
                          "(utils.eval.precision.default_setting), float32 elsewhere (GPUs included); fp32, bf16, "
                          "fp16: autocast the model and encoder to that type (scores use float32)",
                       "auto (the default): channels-last with bf16/fp16 (tensor cores, oneDNN's bf16 kernels), the default layout "
                       "with float32; contiguous or channels_last: that layout")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone (TorchInductor, weights frozen): about 1.2x faster per forward and "
                        "40%% less memory for BRN on a CPU, but each new image or tile size first takes about 20 s (BRN) to "
                        "minutes (DRSformer) to compile; worth it for many photos of one size or a tiled large photo (docs/speed.md)")
    g.add_argument("--tile", type=int, default=None,
                   help="tile images larger than this (default: whole images; IDT always tiles at 128)")
    g.add_argument("--tile_overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels")
    g.add_argument("--max_memory", default=None,
                   help="memory budget without --tile (8G, 1500M): each image is restored whole when it fits, else "
                        "in the fewest tiles that fit, each as small as that number allows, so the fewest pixels are "
                        "computed (default: what the run holds + 60%% of the free RAM, 85%% of free GPU memory)")
    add_device_args(p.add_argument_group("device"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # large activations reuse freed memory instead of fresh, kernel-zeroed pages
    if args.test_model is None and not args.list_models:
        parser.error("--test_model is required: a checkpoint file or a published name (see --list_models)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list_models:
        print(describe_published(args.weights_dir))
        return 0
    with trusted_checkpoints(args.trust_checkpoint):
        return cli_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Evaluate as the flags say; prints the per-folder lines and the summary."""
    device = resolve_device(args)
    choice = choose_checkpoint(args.test_model, args.model_name, args.load_mode)  # a file, or a published name
    args.model_name, args.load_mode = choice.model_name, choice.load_mode
    if args.model_name not in available_models():
        raise UserError(f"unknown --model_name {args.model_name!r}; choose one of: {', '.join(available_models())}")
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be a positive number of pixels, got {args.tile}; "
                        "leave --tile out to derain whole images")
    try:
        metrics = parse_metrics(",".join(args.metrics)) if args.metrics is not None else None
    except ValueError as exc:
        raise UserError(f"--metrics: {exc}") from None
    # Resolve the inputs before loading the model: a typo in a path fails at once.
    if args.testset:
        sets = [collect_testset(n, args.data_root) for n in args.testset]
    else:
        sets = [(None, *collect_test_inputs(args.test_dir))]
    model_path, feat_ext = choice.files(args.feat_ext, args.weights_dir)  # published files: downloaded, verified
    model, ckpt = load_model(args.model_name, model_path, args.load_mode, device, {"inter_iter": args.inter_iter})
    encoder = load_encoder(feat_ext, ckpt, model_path, device) if args.load_mode == "tran" else None
    if args.tile and args.max_memory:
        raise UserError("--max_memory chooses the tiles when --tile is not given; pass one of them")
    example_z = image_code(encoder, torch.rand(1, 3, 64, 64, device=device)) if encoder is not None else None
    setting = setting_from_flags(args.precision, args.memory_format, device, model, example_z)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    amp = AMP_DTYPES[setting.amp or "off"]
    max_memory = None if args.tile else (parse_size(args.max_memory) if args.max_memory else default_budget(device))
    if max_memory is not None:
        logging.getLogger("coic.memory").info("memory budget: %s%s", format_size(max_memory),
                                              "" if args.max_memory else " (default)")
    summary, report_sets, unreadable = [], [], []
    for name, folder, items in sets:
        out = os.path.join(args.save_path, name) if name else args.save_path
        os.makedirs(out, exist_ok=True)
        rows = evaluate(model, encoder, items, out, device, args.tile, args.tile_overlap,
                        protocol=args.metric_protocol, skip_existing=args.skip_existing,
                        table_path=os.path.join(out, "results.csv"), desc=name or "test", amp=amp,
                        memory_format=memory_format, max_memory=max_memory, metrics=metrics,
                        niqe_channel=args.niqe_channel, strict=args.strict, compile_model=args.compile)
        summary.append(summarize(name or folder, rows))
        derained = [(item, row) for item, row in zip(items, rows) if not row.get("error")]
        unreadable += [f"{rain}" for (rain, _), row in zip(items, rows) if row.get("error")]
        report_sets.append(ReportSet(name or folder, [i for i, _ in derained],
                                     [os.path.join(out, output_name(rain)) for (rain, _), _ in derained],
                                     [r for _, r in derained]))
        print(f"{len(derained)} images from {folder} -> {out}")
    if args.testset:
        table = with_mean(summary)
        write_summary(table, args.save_path, args.metric_protocol, args.niqe_channel)
        print(format_markdown(table, args.metric_protocol, args.niqe_channel))
    else:
        table = summary
        _print_averages(summary[0], args.metric_protocol, args.niqe_channel)
    has_niqe = any(s["niqe_out"] is not None for s in summary)
    made_by = run_description(args.test_model, args.model_name, args.load_mode, setting, args.tile, args.tile_overlap,
                              max_memory, compiled=args.compile)
    page = write_report(args.save_path, report_sets, _report_columns(summary), table,
                        title=f"CoIC deraining report: {os.path.basename(args.test_model)}",
                        notes=made_by + [n.replace("`", "") for n in
                                         protocol_notes(args.metric_protocol, args.niqe_channel if has_niqe else None)])
    print(f"report page: {page}")
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise DataError(f"{len(unreadable)} image(s) could not be read (or did not fit --max_memory) and were not derained: "
                        f"{shown} (reasons in results.csv); the other images were derained; --strict stops at the first")
    return 0


def _report_columns(summary: list[dict]) -> list[ReportColumn]:
    """The report's score columns: those some set has, each with its direction from ``METRICS``."""
    columns = []
    for key, metric, label in (("psnr", "psnr", "PSNR"), ("ssim", "ssim", "SSIM"),
                               ("niqe_rain", "niqe", "NIQE (rainy)"), ("niqe_out", "niqe", "NIQE (derained)")):
        if any(s.get(key) is not None for s in summary):
            m = METRICS[metric]
            columns.append(ReportColumn(key, label, m.digits, "higher" if m.higher_is_better else "lower"))
    return columns


def _print_averages(s: dict, protocol: str, niqe_channel: str) -> None:
    """The one-folder summary lines (the published test script's ``Avg. psnr``/``Avg. ssim``, then NIQE)."""
    if s["psnr"] is not None:
        print(f"Avg. psnr: {s['psnr']:.4f}  ({protocol} protocol)")
        print(f"Avg. ssim: {s['ssim']:.4f}")
    if s["niqe_out"] is not None:
        print(f"Avg. niqe: rainy {s['niqe_rain']:.4f} -> derained {s['niqe_out']:.4f} ({s['niqe_change']:+.4f}; "
              f"lower is better; {s['niqe_scored']} images)")
        print(protocol_notes(protocol, niqe_channel)[1])


if __name__ == "__main__":
    raise SystemExit(main())
