"""What every ``train_<Backbone>.py`` runs: train, and for ``--demo`` build data and evaluate."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import torch

from utils.allocator import keep_freed_memory
from utils.data.layouts import find_pairs
from utils.errors import UserError, cli_main
from utils.images import read_image, save_image
from utils.train.config import REFERENCE_DATA_PATHS, parse_train_args

logger = logging.getLogger("coic")


def demo_checkpoint(last: str, model_name: str, demo_root: str, args, device: torch.device) -> str:
    """The demo checkpoint to evaluate: of those saved since CoIC started, the one whose worst rain type
    gains most on a few pictures of each type's val split (``utils.train.selection``; never the test
    split); ``last`` when there is no other. Prints the choice and why."""
    from utils.data.demo import demo_splits
    from utils.train.selection import select_checkpoint
    from utils.train.state import checkpoint_iteration, list_checkpoints

    candidates = [p for p in list_checkpoints(args.save_path)
                  if checkpoint_iteration(p) >= min(args.stage1_iters, args.tot_iters)]
    if len(candidates) < 2:
        return last
    chosen, gains = select_checkpoint(candidates, model_name, demo_splits(demo_root, "val"), device, per_set=4)
    worst = {name: min(g.values()) for name, g in gains.items()}
    for name, g in gains.items():
        logger.info("%s on the val split: %s (worst %+.2f dB)", name,
                    ", ".join(f"{k} {v:+.2f}" for k, v in g.items()), worst[name])
    name = os.path.basename(chosen)
    print(f"\nevaluating {name}: of the {len(candidates)} checkpoints since CoIC started, the one whose worst rain "
          f"type gains most on the val split ({worst[name]:+.2f} dB; the last one's worst: "
          f"{worst[os.path.basename(candidates[-1])]:+.2f} dB)")
    # Keep the choice and the last checkpoint (resume, and the other end of the trade); a rerun picks
    # the same one from these two. The others are 15-30 MB each.
    dropped = [p for p in candidates if p not in (chosen, candidates[-1])]
    for path in dropped:
        os.remove(path)
    if dropped:
        kept = f"{name} (chosen, the last)" if chosen == candidates[-1] else \
            f"{name} (chosen) and {os.path.basename(candidates[-1])} (last)"
        logger.info("kept %s; removed the other %d candidate%s", kept, len(dropped), "s" * (len(dropped) > 1))
    return chosen


def demo_report(checkpoint: str, model_name: str, demo_root: str, save_path: str, device: torch.device) -> list[dict]:
    """Evaluate a demo checkpoint on each rain type's test split; print the table, write pictures.

    PSNR/SSIM against the clean images, and NIQE (no reference; lower is better) of the rainy
    and the derained images, each a mean over the type's test images.
    """
    from utils.data.demo import RAIN_TYPES
    from utils.eval.evaluation import evaluate, load_encoder, load_model, output_name
    from utils.metrics import psnr, ssim

    model, ckpt = load_model(model_name, checkpoint, "tran", device)
    encoder = load_encoder(None, ckpt, checkpoint, device)
    rows = []
    for kind in RAIN_TYPES:
        pairs = find_pairs(os.path.join(demo_root, kind, "test"))
        out_dir = os.path.join(save_path, "demo_results", kind)
        results = evaluate(model, encoder, pairs, out_dir, device, progress=False, metrics=("psnr", "ssim", "niqe"),
                           desc=kind)
        rainy = [(read_image(r), read_image(c)) for r, c in pairs]
        # The colour cast: each derained picture's mean error per RGB channel; the worst channel of the worst picture.
        errors = [(read_image(os.path.join(out_dir, output_name(r))) - c).mean(dim=(1, 2)) for (r, _), (_, c)
                  in zip(pairs, rainy)]
        row = {
            "type": kind,
            "rain_psnr": _mean([psnr(r, c) for r, c in rainy]),
            "rain_ssim": _mean([ssim(r, c) for r, c in rainy]),
            "out_psnr": _mean([r["psnr"] for r in results]),
            "out_ssim": _mean([r["ssim"] for r in results]),
            "rain_niqe": _mean([r["niqe_rain"] for r in results]),
            "out_niqe": _mean([r["niqe_out"] for r in results]),
            "colour_error": max(float(e.abs().max()) for e in errors),
        }
        # One side-by-side picture per type: rainy | derained | clean.
        first = pairs[0]
        derained = read_image(os.path.join(out_dir, output_name(first[0])))
        picture = os.path.join(save_path, f"demo_{kind}.png")
        save_image(torch.cat([read_image(first[0]), derained, read_image(first[1])], dim=-1), picture)
        row["picture"] = picture
        rows.append(row)
    print_demo_table(rows, model_name)
    if encoder is not None:
        print_probe(encoder, demo_root, device)
    return rows


def print_probe(encoder, demo_root: str, device: torch.device) -> None:
    """One line: how often z names the rain type of a held-out picture, against an untrained encoder."""
    from models import build_encoder
    from utils.data.demo import RAIN_TYPES, demo_splits
    from utils.eval.probe import format_value, key_encoder, probe, read_probe_sets

    fit, held = read_probe_sets(list(demo_splits(demo_root, "train").values()),
                                list(demo_splits(demo_root, "val").values()), list(RAIN_TYPES), 16, 0)
    trained = probe(key_encoder(encoder), fit, held)
    torch.manual_seed(0)
    untrained = probe(key_encoder(build_encoder().eval()), fit, held)
    f = format_value
    print(f"z names the rain type of {f(trained.accuracy, True)} of the held-out val pictures, "
          f"{f(trained.scene_accuracy, True)} fitted on the other val scenes (an untrained encoder: "
          f"{f(untrained.accuracy, True)} and {f(untrained.scene_accuracy, True)}, chance "
          f"{f(trained.chance, True)}; python -m analysis.probe)")


def print_demo_table(rows: list[dict], model_name: str) -> None:
    """The demo's table of ``rows`` (one per rain type, as ``demo_report`` builds them), a mean row,
    the pictures, and one line per type that the model made worse, saying why and what to try."""
    mean = {"type": "mean", **{k: _mean([r[k] for r in rows]) for k in rows[0] if k not in ("type", "picture")}}
    if "colour_error" in rows[0]:
        mean["colour_error"] = max(r["colour_error"] for r in rows)  # the worst of all, not an average
    print()
    print(f"{'rain type':<12} {'rainy PSNR/SSIM':>17} {'derained PSNR/SSIM':>20} {'gain dB':>8}   "
          f"{'NIQE rainy -> derained':>22} {'colour error':>13}")
    for r in rows + [mean]:
        niqe = ("—" if r["out_niqe"] is None else f"{r['rain_niqe']:.2f} -> {r['out_niqe']:.2f}")
        print(f"{r['type']:<12} {r['rain_psnr']:>9.2f}/{r['rain_ssim']:.4f} {r['out_psnr']:>12.2f}/{r['out_ssim']:.4f}"
              f" {r['out_psnr'] - r['rain_psnr']:>+8.2f}   {niqe:>22} {r.get('colour_error', float('nan')):>13.3f}")
    print("NIQE: MATLAB niqe_release on Y, lower is better (— where the test images are under 192 x 192); colour "
          "error: the largest mean error of one RGB channel over the type's pictures (0 to 1; a cast shows above 0.02)")
    print("side-by-side pictures (rainy | derained | clean):")
    for r in rows:
        print(f"  {r['picture']}")
    from models import backbone

    baselines = [name for name in backbone(model_name).published_weights if name.startswith("baseline-")]
    hint = (f"; try starting from the published weights: train_{model_name}.py --demo --pretrained {baselines[0]}"
            if baselines else "")
    for r in rows:
        if r["out_psnr"] < r["rain_psnr"]:
            print(f"{r['type']}: derained {r['rain_psnr'] - r['out_psnr']:.2f} dB below the rainy input. A demo-sized "
                  "model trained for minutes removes about the same amount of rain from every picture, too much "
                  f"where there is little (docs/demo.md, 'What to expect'){hint}")


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def main(model_name: str, argv: Optional[Sequence[str]] = None) -> int:
    args = parse_train_args(model_name, argv)
    keep_freed_memory()  # activations and gradients reuse freed memory instead of fresh, kernel-zeroed pages
    from utils.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted, setup_logging

    setup_logging()

    def work() -> int:
        try:
            if args.demo:
                from utils.data.demo import build_demo_data, default_root, demo_splits

                demo_root = build_demo_data(default_root())
                if args.data_paths == REFERENCE_DATA_PATHS:  # not typed: the demo's own training splits
                    args.data_paths = ",".join(demo_splits(demo_root, "train").values())
                    if args.probe_paths is None:  # the probe scores z on the held-out validation scenes
                        args.probe_paths = ",".join(demo_splits(demo_root, "val").values())
            trainer = Trainer(args)
            last = trainer.train()
            if args.demo:
                chosen = demo_checkpoint(last, model_name, demo_root, args, trainer.device)
                demo_report(chosen, model_name, demo_root, args.save_path, trainer.device)
        except TrainingInterrupted as exc:
            print(f"{exc}", file=sys.stderr)
            return 128 + exc.signum
        except TrainingDiverged as exc:  # the data or the learning rate, not the code
            raise UserError(str(exc)) from exc
        return 0

    return cli_main(work, interrupted="stopped at once without saving; rerun the same command to resume from "
                                      "the last checkpoint")
