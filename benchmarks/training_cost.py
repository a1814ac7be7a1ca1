"""Training compute of each run of ``reproduce.py`` and the GPU hours it implies at an assumed rate.

Per backbone at its reference recipe (batch, crop, iterations, stage 1 of 40k): the multiply-
accumulates of one training image, counted with PyTorch's FLOP counter on meta tensors (nothing is
computed), in stage 1 (the backbone alone) and in the CoIC stage (the modulated backbone, the query
encoder on the crop-sized query, the key encoder on the positive and the 1 + ``n_neg`` negatives).
A training step costs about 3x its forward (the backward pass about 2x), the key encoder forward
only. The hours are compute / ``--tflops`` (sustained, not peak): an assumption, not a measurement.

    python -m benchmarks.training_cost --tflops 25
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


import torch

from analysis.model_cost import count_macs
from models import available_models, build_encoder, build_model
from utils.cli import Parser, add_list
from utils.tables import markdown_row, markdown_table
from utils.train.config import parse_train_args

N_NEG = 4  # the default --n_neg: detail-aware negatives per query


def image_macs(name: str) -> dict[str, float]:
    """MACs of one training image of ``name``'s reference recipe: backbone plain and modulated, query encoder."""
    args = parse_train_args(name, [])
    model = build_model(name, **args.model_hparams).to("meta").eval()
    encoder = build_encoder(dim=args.dim_in).to("meta").eval()
    x = torch.empty(1, 3, args.crop_size, args.crop_size, device="meta")
    z = torch.empty(1, args.dim_in, device="meta")
    return {"plain": count_macs(lambda: model(x)), "modulated": count_macs(lambda: model(x, z)),
            "encoder": count_macs(lambda: encoder(x)), "batch": args.batch_size, "iters": args.tot_iters,
            "stage1": args.stage1_iters, "crop": args.crop_size}


def run_flops(m: dict[str, float], coic: bool) -> float:
    """Training FLOPs (2 per MAC) of a whole run, without (stage 1 throughout) or with CoIC."""
    stage1 = 3 * m["plain"]
    stage2 = 3 * m["modulated"] + 3 * m["encoder"] + (2 + N_NEG) * m["encoder"]
    iters1 = m["iters"] if not coic else min(m["stage1"], m["iters"])
    return 2 * m["batch"] * (iters1 * stage1 + (m["iters"] - iters1) * stage2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_list(p, "--tflops", type=float, default=[25.0, 60.0], metavar="T",
             help="sustained TFLOP/s to convert compute into hours, space- or comma-separated (assumptions; "
                  "default: 25 60)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    header = ["backbone", "batch x crop, iterations", "GMAC/image plain / modulated / encoder", "PFLOP w/o / w/ CoIC",
              *(f"h at {t:g} TFLOP/s w/o / w/" for t in args.tflops)]
    print("\n".join(markdown_table(header, [])))
    for name in available_models():
        m = image_macs(name)
        plain, coic = run_flops(m, False), run_flops(m, True)
        hours = [f"{plain / (t * 1e12) / 3600:.0f} / {coic / (t * 1e12) / 3600:.0f}" for t in args.tflops]
        print(markdown_row([name, f"{m['batch']} x {m['crop']}, {m['iters'] // 1000}k",
                            f"{m['plain'] / 1e9:.2f} / {m['modulated'] / 1e9:.2f} / {m['encoder'] / 1e9:.3f}",
                            f"{plain / 1e15:.0f} / {coic / 1e15:.0f}", *hours]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
