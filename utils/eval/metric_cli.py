"""``python -m utils.metrics niqe FOLDER``: the NIQE of every image of a folder, as the published
``eval_niqe.py`` reports it (a mean), with a progress bar and a per-image CSV.

    python -m utils.metrics niqe results/RealInt                 # Y channel (MATLAB niqe_release)
    python -m utils.metrics niqe results/RealInt --channel gray  # pyiqa's default NIQE
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from utils.allocator import keep_freed_memory
from utils.cli import HelpFormatter
from utils.data.layouts import find_images
from utils.errors import DataError, cli_main
from utils.images import UnreadableImageError, read_image
from utils.niqe import CHANNELS, MIN_SIDE, NIQEUndefined, niqe
from utils.tables import write_csv

logger = logging.getLogger("coic.metrics")

__all__ = ["build_parser", "main", "score_folder"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.metrics", description="No-reference scores of a folder.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="metric", required=True)
    q = sub.add_parser("niqe", help="NIQE of every image of a folder (lower is better)",
                       formatter_class=HelpFormatter)
    q.add_argument("folder", help="a folder of images (searched as test_model.py does: rain/ or the folder itself)")
    q.add_argument("--channel", default="y", choices=CHANNELS,
                   help="y: MATLAB rgb2ycbcr Y (niqe_release); gray: 0.299R+0.587G+0.114B (pyiqa's default)")
    q.add_argument("--csv", default=None, help="per-image CSV (default: FOLDER/niqe_<channel>.csv)")
    q.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def score_folder(folder: str, channel: str = "y",
                 progress: bool = True) -> list[tuple[str, Optional[float], str]]:
    """(file name, NIQE or None, why there is none) of every image under ``folder``: NIQE is undefined
    under ``MIN_SIDE`` or on a flat image (no reason given), and an unreadable image gets its reason."""
    from tqdm import tqdm

    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder; pass a folder of images")
    _, images = find_images(folder)
    if not images:
        raise DataError(f"{folder} holds no images")
    rows, undefined = [], []
    for path in tqdm(images, desc="niqe", unit="img", disable=not progress, dynamic_ncols=True):
        name = os.path.basename(path)
        try:
            rows.append((name, niqe(read_image(path), channel), ""))
        except NIQEUndefined as exc:  # smaller than MIN_SIDE or flat
            undefined.append(f"{name}: {exc}")
            rows.append((name, None, ""))
        except UnreadableImageError as exc:  # listed at the end; the other images are scored
            logger.warning("%s", exc)
            rows.append((name, None, str(exc)))
    if undefined:
        logger.warning("%d images have no NIQE (left empty), e.g. %s", len(undefined), undefined[0])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run() -> int:
        rows = score_folder(args.folder, args.channel, progress=not args.no_progress)
        out = args.csv or os.path.join(args.folder, f"niqe_{args.channel}.csv")
        write_csv(out, ["name", "niqe", "channel", "error"],
                  [[name, "" if value is None else f"{value:.4f}", args.channel, error] for name, value, error in rows])
        scored = [v for _, v, _ in rows if v is not None]
        unreadable = [name for name, _, error in rows if error]
        if scored:
            print(f"NIQE ({args.channel}) of {len(scored)} images in {args.folder}: mean "
                  f"{sum(scored) / len(scored):.4f}  (lower is better) -> {out}")
        if unreadable:
            shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
            raise DataError(f"{len(unreadable)} image(s) in {args.folder} could not be read and have no NIQE: {shown} "
                            f"(reasons in {out}); the other images were scored")
        if not scored:
            raise DataError(f"no image in {args.folder} is at least {MIN_SIDE}x{MIN_SIDE} pixels; NIQE needs that")
        return 0

    return cli_main(run)
