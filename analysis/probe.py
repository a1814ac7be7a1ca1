"""A probe of z: does the encoder's code tell rain types apart, and does it see rain and detail?

    python -m analysis.probe --feat_ext runs/demo_BRN/ckpt_0000600.pth --demo_root demo_data
    python -m analysis.probe --feat_ext CKPT --fit_paths A/train B/train --data_paths A/test B/test

One folder per rain type (a class); ``--fit_paths`` are the images the classifier is fitted on
(the training folders), ``--data_paths`` the held-out images it is scored on, in the same order.
z is computed as at test time: the key encoder on the whole rainy image resized to 128 x 128.
Three numbers, each with what an encoder that ignores the property scores:

- **rain-type accuracy**: a nearest-class-mean classifier on z (cosine to each class's mean z
  over the fit images) names the class of this many held-out images (chance: 1 / classes);
- **rain gap**: over held-out scenes rendered under every class (the same file name in each
  folder, as in the demo data), mean cos(z) of two scenes under one rain minus mean cos(z) of one
  scene under two rains. Positive: z groups pictures by rain more than by scene (0: no preference).
  With it, **rain retrieval**: how often a picture's nearest other code shares its rain type;
- **detail gap**: on the held-out clean images, mean cos(z(x), z(flip x)) minus mean
  cos(z(x), z(blur x)) with the strongest training blur (σ = 1.5). Positive: blurring moves z
  more than flipping, which the contrastive loss teaches z to ignore (0: blind to detail).

``--untrained`` scores a freshly initialised encoder (``--seed``) on the same images: the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import Optional, Sequence

import torch

from analysis.common import (AnalysisError, add_output_args, check_labels, load_encoder_file, markdown_table,
                             run_tool, split_paths, write_text)
from utils.cli import HelpFormatter, add_list
from utils.eval.probe import ProbeResult, format_value, key_encoder, probe, read_probe_sets


def probe_table(results: dict[str, ProbeResult]) -> str:
    """A Markdown table: one row per probed encoder."""
    f = format_value
    rows = [[name, f(r.accuracy, True), f(r.scene_accuracy, True), f(r.chance, True), f(r.rain_gap),
             f(r.rain_retrieval, True), f(r.retrieval_chance, True), f(r.detail_gap)] for name, r in results.items()]
    return markdown_table(["encoder", "rain-type accuracy", "fitted on other scenes", "chance", "rain gap",
                           "rain retrieval", "retrieval chance", "detail gap"], rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("what to probe")
    g.add_argument("--feat_ext", default=None,
                   help="encoder checkpoint: one of our ckpt_*.pth (its encoder), or a published MoCo state_dict")
    g.add_argument("--untrained", action="store_true",
                   help="also probe a freshly initialised encoder (seed --seed): what z knows without training")
    g.add_argument("--demo_root", default=None,
                   help="built demo data: fit on each type's train split, score on its --split")
    g.add_argument("--split", default="val", choices=["val", "test"], help="held-out split of --demo_root")
    add_list(g, "--fit_paths", default=None, metavar="PATH",
                   help="one folder (rain/ + norain/) per rain type to fit the classifier on (space- or "
                        "comma-separated)")
    add_list(g, "--data_paths", default=None, metavar="PATH",
                   help="one held-out folder per rain type, in the order of --fit_paths")
    add_list(g, "--labels", default=None, metavar="NAME", help="a name per rain type (default: from the paths)")
    g.add_argument("--num_fit", type=int, default=32, help="fit images per rain type, drawn with --seed (0: all)")
    g.add_argument("--num_images", type=int, default=0, help="held-out images per rain type (0: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fit draw and of --untrained")
    g.add_argument("--feature", choices=["z", "feat"], default="z",
                   help="z: the code that modulates the model; feat: the encoder's pooled feature map, which the "
                        "contrastive loss trains (z is an MLP on it)")
    add_output_args(p, "analysis_results/probe")
    return p


def _paths(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    if args.demo_root:
        from utils.data.demo import RAIN_TYPES, demo_splits

        if args.fit_paths or args.data_paths:
            raise AnalysisError("give either --demo_root or --fit_paths with --data_paths, not both")
        return (list(demo_splits(args.demo_root, "train").values()),
                list(demo_splits(args.demo_root, args.split).values()), list(RAIN_TYPES))
    if not args.fit_paths or not args.data_paths:
        raise AnalysisError("give --demo_root, or --fit_paths and --data_paths (one folder per rain type each)")
    fit, held = split_paths(args.fit_paths), split_paths(args.data_paths)
    return fit, held, check_labels(args.labels, held)


def run(args: argparse.Namespace, device: torch.device) -> str:
    if not args.feat_ext and not args.untrained:
        raise AnalysisError("give --feat_ext CKPT (the encoder to probe), --untrained, or both")
    fit_paths, held_paths, labels = _paths(args)
    if len(fit_paths) != len(held_paths):
        raise AnalysisError(f"--fit_paths has {len(fit_paths)} folders and --data_paths {len(held_paths)}: "
                            "give one of each per rain type, in the same order")
    if len(fit_paths) < 2:
        raise AnalysisError("the probe needs at least 2 rain types (one folder each in --fit_paths and --data_paths)")
    for path in fit_paths + held_paths:
        if not os.path.isdir(path):
            raise AnalysisError(f"data path {path} does not exist")
    fit, held = read_probe_sets(fit_paths, held_paths, labels, args.num_fit, args.num_images, args.seed)
    encoders = {}
    if args.feat_ext:
        encoders[os.path.basename(args.feat_ext)] = load_encoder_file(args.feat_ext, device)[0]
    if args.untrained:
        from models import build_encoder

        torch.manual_seed(args.seed)
        encoders["untrained"] = build_encoder().to(device).eval()
    results = {}
    for name, encoder in encoders.items():
        enc = key_encoder(encoder, args.feature)
        results[name] = probe(lambda x, enc=enc: enc(x.to(device)).cpu(), fit, held)
    os.makedirs(args.save_path, exist_ok=True)
    with open(os.path.join(args.save_path, "probe.json"), "w") as f:
        json.dump({name: asdict(r) for name, r in results.items()}, f, indent=1)
    summary = probe_table(results) + "\n"
    write_text(os.path.join(args.save_path, "probe.md"), summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
