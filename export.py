"""Export a deraining checkpoint to ONNX: one graph from the rainy image to the derained one.

    python export.py --test_model coic-brn --format onnx --save_path brn.onnx
    python export.py --test_model MODEL.pth --model_name DRSformer --save_path drsformer.onnx --size 256 256

``--test_model`` is resolved as ``test_model.py`` resolves it (a published name or a checkpoint
file). A CoIC checkpoint exports with its encoder: the graph takes ``rain`` (1,3,H,W) float32
in [0,1], any H and W, and returns ``derained`` (1,3,H,W) in [0,1]. See docs/deploy.md.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from models import available_models
from models.pretrained import published_names
from utils.allocator import keep_freed_memory
from utils.checkpoint import trusted_checkpoints
from utils.cli import Parser, add_alias
from utils.errors import cli_main
from utils.eval.export import DEFAULT_OPSET, DEFAULT_OVERLAP, check_writable, export_onnx, load_for_export


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Export a (CoIC) deraining checkpoint to ONNX.")
    g = p.add_argument_group("input")
    g.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example input the graph is traced with (H and W stay dynamic; default: a few pixels "
                        "above 64, or above the tile for IDT)")
    g = p.add_argument_group("model")
    g.add_argument("--test_model", required=True,
                   help="required: backbone checkpoint (ours, or a published state_dict), or a published name: "
                   + ", ".join(published_names()))
    add_alias(g, "--checkpoint", "--test_model")
    g.add_argument("--model_name", default=None,
                   help=f"backbone: {', '.join(available_models())} (default: a published name's, a checkpoint's own, else BRN)")
    g.add_argument("--load_mode", default=None, choices=["normal", "base", "tran"],
                   help="tran: the graph holds the encoder and modulates; normal/base: the plain backbone "
                        "(default: tran for a coic-* name or a checkpoint holding an encoder)")
    g.add_argument("--feat_ext", default=None, help="encoder checkpoint (default: the one inside --test_model)")
    add_alias(g, "--encoder", "--feat_ext")
    g.add_argument("--weights_dir", default=None, help="offline: take the published files from this folder")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load a checkpoint that holds objects beyond tensors with the full unpickler, which runs any "
                        "code it names: only for files from a source you trust")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", required=True, help="required: the ONNX file to write")
    add_alias(g, "--out", "--save_path")
    g.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (18+: Resize with antialias)")
    g = p.add_argument_group("speed")
    g.add_argument("--tile_overlap", type=int, default=DEFAULT_OVERLAP,
                   help="overlap of neighbouring tiles, for backbones that run in tiles (IDT)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the exporter logs every rewrite at INFO
    with trusted_checkpoints(args.trust_checkpoint):
        return cli_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Load, export, print where the file went."""
    check_writable(args.save_path)  # before the model is loaded: a wrong --save_path fails at once
    model, encoder, mode = load_for_export(args.test_model, args.model_name, args.load_mode, args.feat_ext,
                                           args.weights_dir)
    export_onnx(model, encoder, args.save_path, size=args.size, opset=args.opset, overlap=args.tile_overlap)
    print(f"{type(model).__name__} ({'with the CoIC encoder' if encoder is not None else 'plain'}, "
          f"--load_mode {mode}) -> {args.save_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
