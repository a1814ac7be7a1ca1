"""CoIC's effect at demo scale: does z learn the rain, and does CoIC beat the plain backbone?

    python reproduce.py coic_effect              # train, evaluate, write the curves and the paired table
    python reproduce.py coic_effect --dry_run    # the design: runs, seeds, lengths, where results go

The design, fixed before any run:

- **data**: the demo data (``utils/data/demo.py``): four rain types, every scene under each; the
  models train on ``train``; every choice and curve uses ``val`` (other scenes of the training
  sources); ``test`` (other source pictures) is read once, at the last checkpoint;
- **arms**: the BRN demo recipe (colour channels shuffled) without CoIC (``--contra_loss_weight 0``,
  z never used) and with CoIC from iteration ``--stage1_iters``; each seed trains both arms from
  the same initialisation and the same batches (paired seeds);
- **curves**: every ``--eval_every`` iterations, the probe of z on ``val`` (``utils.eval.probe``)
  and the mean PSNR gain over the rainy input on ``val``, per arm, with the spread over seeds;
- **criterion**: at the last checkpoint, the paired difference CoIC − plain of the mean test PSNR
  over the four types; its 95 % interval over seeds (Student's t). The comparison is decided
  when the interval excludes 0, whichever side it falls on.

Writes ``curves.png``, ``paired.png``, ``paired.csv``, ``paired.md``, ``curves.csv`` and
``summary.md`` to ``--save_path``; rerunning resumes the trainings and reuses evaluations.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from utils.cli import HelpFormatter, add_list
from utils.errors import UserError, cli_main

ARMS = ("plain", "coic")
TYPES_KEY = "types"


@dataclass(frozen=True)
class Design:
    seeds: tuple[int, ...]
    iters: int
    eval_every: int
    stage1_iters: int
    data_root: str
    runs_root: str
    save_path: str
    jobs: int
    exemplars: str
    tiny: bool = False

    def run_dir(self, arm: str, seed: int) -> str:
        return os.path.join(self.runs_root, f"{arm}_seed{seed}")


def train_argv(design: Design, arm: str, seed: int) -> list[str]:
    """The ``train_BRN.py`` flags of one run: the demo recipe, the arm's CoIC setting, this seed."""
    from utils.data.demo import demo_splits
    from utils.train.recipes import get_recipe

    flags = {k: v for k, v in get_recipe("BRN").demo.items() if k not in ("tot_iters", "stage1_iters", "save_freq",
                                                                           "keep_checkpoints")}
    if design.tiny:  # the suite: the recipe's smallest model, a few iterations
        flags = {}
    argv = ["--tiny"] if design.tiny else []
    for key, value in flags.items():
        if key in ("probe_freq",):
            continue  # set below
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        else:
            argv += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])
    coic = arm == "coic"
    argv += ["--data_paths", ",".join(demo_splits(design.data_root, "train").values()),
             "--probe_paths", ",".join(demo_splits(design.data_root, "val").values()),
             "--save_path", design.run_dir(arm, seed), "--seed", str(seed),
             "--tot_iters", str(design.iters), "--save_freq", str(design.eval_every),
             "--probe_freq", str(design.eval_every), "--keep_checkpoints", str(design.iters // design.eval_every + 2),
             "--stage1_iters", str(design.stage1_iters if coic else design.iters),
             "--contra_loss_weight", "0.2" if coic else "0", "--exemplars", design.exemplars,
             "--num_workers", "0", "--log_freq", str(design.eval_every)]
    return argv


def _train(job: tuple[list[str], int]) -> str:
    """Train one run in this process (a pool worker): returns its last checkpoint."""
    argv, threads = job
    torch.set_num_threads(threads)
    from utils.logs import setup_logging
    from utils.train.config import parse_train_args
    from utils.train.trainer import Trainer

    setup_logging()
    return Trainer(parse_train_args("BRN", argv)).train()


def run_trainings(design: Design) -> None:
    jobs = [(train_argv(design, arm, seed), max(1, (os.cpu_count() or 1) // design.jobs))
            for seed in design.seeds for arm in ARMS]
    if design.jobs == 1:
        for job in jobs:
            _train(job)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(design.jobs) as pool:
        for _ in pool.imap_unordered(_train, jobs):
            pass


# ------------------------------------------------------------------ evaluation
@torch.inference_mode()
def score_checkpoint(path: str, arm: str, pairs: dict[str, list[tuple[str, str]]], cache: dict) -> dict:
    """{type: {"gain": mean PSNR gain in dB, "channel_error": [mean error of R, G, B] of the worst picture}}.

    The plain arm runs without z (as its training did); CoIC with z from its key encoder.
    """
    from utils.eval.evaluation import load_encoder, load_model
    from utils.eval.inference import image_code, restore
    from utils.images import read_image
    from utils.metrics import psnr

    device = torch.device("cpu")
    model, ckpt = load_model("BRN", path, "tran" if arm == "coic" else "normal", device)
    encoder = load_encoder(None, ckpt, path, device) if arm == "coic" else None
    out = {}
    for kind, items in pairs.items():
        gains, errors = [], []
        for rain_path, clean_path in items:
            if rain_path not in cache:
                rain, clean = read_image(rain_path), read_image(clean_path)
                cache[rain_path] = (rain, clean, psnr(rain, clean))
            rain, clean, rainy_psnr = cache[rain_path]
            x = rain[None]
            y = restore(model, x, image_code(encoder, x) if encoder is not None else None)[0].float()
            gains.append(psnr(y, clean) - rainy_psnr)
            errors.append([float(e) for e in (y - clean).mean(dim=(1, 2))])
        worst = max(errors, key=lambda e: max(abs(v) for v in e))
        out[kind] = {"gain": sum(gains) / len(gains), "channel_error": worst}
    return out


def key_query_distance(path: str) -> Optional[float]:
    """||key encoder - query encoder|| / ||query encoder|| over their parameters (None without an encoder)."""
    from utils.checkpoint import read_checkpoint

    state = read_checkpoint(path).get("encoder")
    if state is None:
        return None
    diff = norm = 0.0
    for name, q in state.items():
        if name.startswith("encoder_q.") and q.is_floating_point() and "running" not in name:
            k = state["encoder_k." + name[len("encoder_q."):]]
            diff += float((k.double() - q.double()).pow(2).sum())
            norm += float(q.double().pow(2).sum())
    return math.sqrt(diff / norm) if norm else None


def _evaluate_run(job: tuple[Design, str, int]) -> dict:
    """One run's curve (val, every checkpoint) and last checkpoint (test), cached in its ``evaluation.json``."""
    design, arm, seed = job
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // design.jobs))
    from utils.checkpoint import read_checkpoint
    from utils.data.demo import RAIN_TYPES, demo_splits
    from utils.eval.evaluation import encoder_from_checkpoint
    from utils.data.layouts import find_pairs
    from utils.eval.probe import key_encoder, probe, read_probe_sets
    from utils.train.state import checkpoint_iteration, list_checkpoints

    folder = design.run_dir(arm, seed)
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise UserError(f"{folder} holds no checkpoint: run the trainings first (drop --only eval)")
    cached_path = os.path.join(folder, "evaluation.json")
    cached = {}
    if os.path.isfile(cached_path):
        with open(cached_path) as f:
            cached = json.load(f)
    curve = cached.get("curve", {})
    val = {k: find_pairs(f) for k, f in demo_splits(design.data_root, "val").items()}
    test = {k: find_pairs(f) for k, f in demo_splits(design.data_root, "test").items()}
    probe_sets = None
    cache: dict = {}
    last = checkpoints[-1]
    for path in checkpoints:
        it = str(checkpoint_iteration(path))
        if it in curve or (int(it) % design.eval_every and path != last):  # e.g. a save on an interrupt
            continue
        if probe_sets is None:
            probe_sets = read_probe_sets(list(demo_splits(design.data_root, "train").values()),
                                         list(demo_splits(design.data_root, "val").values()), list(RAIN_TYPES), 16, 0)
        encoder = encoder_from_checkpoint(read_checkpoint(path), torch.device("cpu"))
        p = probe(key_encoder(encoder), *probe_sets)
        pf = probe(key_encoder(encoder, "feat"), *probe_sets)  # the trunk the contrastive loss trains
        curve[it] = {"val": score_checkpoint(path, arm, val, cache), "probe": p.accuracy,
                     "rain_gap": p.rain_gap, "detail_gap": p.detail_gap, "probe_feat": pf.accuracy,
                     "rain_gap_feat": pf.rain_gap}
    test_result = cached.get("test") if cached.get("test_checkpoint") == os.path.basename(last) else None
    if test_result is None:
        test_result = score_checkpoint(last, arm, test, cache)
    entry = {"curve": curve, "test": test_result, "test_checkpoint": os.path.basename(last),
             "key_query_distance": key_query_distance(last)}
    with open(cached_path, "w") as f:
        json.dump(entry, f, indent=1)
    return entry


def evaluate_runs(design: Design) -> dict:
    """Every run's curve and test scores, ``design.jobs`` runs at a time; {(arm, seed): entry}."""
    from tqdm import tqdm

    runs = [(arm, seed) for seed in design.seeds for arm in ARMS]
    jobs = [(design, arm, seed) for arm, seed in runs]
    if design.jobs == 1:
        entries = [_evaluate_run(job) for job in tqdm(jobs, desc="evaluate", unit="run")]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(design.jobs, len(jobs))) as pool:
            entries = list(tqdm(pool.imap(_evaluate_run, jobs), total=len(jobs), desc="evaluate", unit="run"))
    return dict(zip(runs, entries))


# ------------------------------------------------------------------ statistics and outputs
def interval95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, half-width of the two-sided 95 % Student-t interval, sd); half-width nan for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), sd


def paired_rows(design: Design, results: dict) -> tuple[list[list], dict]:
    """Rows (seed, per-type and mean test gain of each arm and their difference) and the summary."""
    from utils.data.demo import RAIN_TYPES

    rows, diffs = [], []
    for seed in design.seeds:
        gains = {arm: [results[(arm, seed)]["test"][k]["gain"] for k in RAIN_TYPES] for arm in ARMS}
        means = {arm: sum(g) / len(g) for arm, g in gains.items()}
        diffs.append(means["coic"] - means["plain"])
        rows.append([seed] + [round(g, 3) for g in gains["plain"]] + [round(means["plain"], 3)]
                    + [round(g, 3) for g in gains["coic"]] + [round(means["coic"], 3)] + [round(diffs[-1], 3)])
    mean, half, sd = interval95(diffs)
    decided = not math.isnan(half) and (mean - half > 0 or mean + half < 0)
    return rows, {"mean": mean, "half": half, "sd": sd, "n": len(diffs), "decided": decided,
                  "wins": sum(d > 0 for d in diffs)}


def write_outputs(design: Design, results: dict) -> str:
    from utils.data.demo import RAIN_TYPES

    os.makedirs(design.save_path, exist_ok=True)
    rows, s = paired_rows(design, results)
    header = (["seed"] + [f"plain {k}" for k in RAIN_TYPES] + ["plain mean"]
              + [f"CoIC {k}" for k in RAIN_TYPES] + ["CoIC mean", "CoIC − plain"])
    with open(os.path.join(design.save_path, "paired.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(f"{v:+.2f}" if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
    verdict = ("decided: CoIC " + ("wins" if s["mean"] > 0 else "loses") if s["decided"]
               else "not decided: the interval includes 0")
    summary = (f"CoIC − plain, mean test PSNR gain over the four types, {s['n']} paired seeds: "
               f"**{s['mean']:+.2f} dB**, 95 % interval ±{s['half']:.2f} (sd {s['sd']:.2f}; CoIC ahead on "
               f"{s['wins']} of {s['n']}), {verdict}.")
    distances = [results[("coic", seed)]["key_query_distance"] for seed in design.seeds]
    distances = [d for d in distances if d is not None]
    if distances:
        summary += (f" Key encoder (test-time z) to query encoder (training z) at the end: "
                    f"{100 * min(distances):.0f}–{100 * max(distances):.0f} % of the query encoder's norm.")
    text = "\n".join(md) + "\n\n" + summary + "\n"
    with open(os.path.join(design.save_path, "paired.md"), "w") as f:
        f.write(text)
    _write_curves(design, results)
    _plot(design, results, rows, header, summary)
    return text


def _curve(results: dict, arm: str, seeds: Sequence[int], key: str) -> tuple[list[int], list[list[float]]]:
    """Iterations and, per iteration, the value over seeds (``key``: "probe" or "gain")."""
    its = sorted({int(i) for seed in seeds for i in results[(arm, seed)]["curve"]})
    values = []
    for it in its:
        v = []
        for seed in seeds:
            point = results[(arm, seed)]["curve"].get(str(it))
            if point is None:
                continue
            if key == "gain":
                v.append(sum(t["gain"] for t in point["val"].values()) / len(point["val"]))
            else:
                v.append(point[key])
        values.append(v)
    return its, values


def _write_curves(design: Design, results: dict) -> None:
    with open(os.path.join(design.save_path, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "iteration", "probe_accuracy", "rain_gap", "detail_gap", "probe_accuracy_feat",
                    "rain_gap_feat", "val_mean_gain", "val_worst_channel_error"])
        for (arm, seed), entry in sorted(results.items()):
            for it, point in sorted(entry["curve"].items(), key=lambda kv: int(kv[0])):
                gain = sum(t["gain"] for t in point["val"].values()) / len(point["val"])
                colour = max(abs(v) for t in point["val"].values() for v in t["channel_error"])
                w.writerow([arm, seed, int(it), round(point["probe"], 4), point["rain_gap"], point["detail_gap"],
                            round(point["probe_feat"], 4), point["rain_gap_feat"], round(gain, 4), round(colour, 4)])


def _plot(design: Design, results: dict, rows: list, header: list, summary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"plain": "#777777", "coic": "#1f77b4"}
    labels = {"plain": "plain BRN (encoder never trained)", "coic": "CoIC"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title, unit in ((axes[0], "probe", "rain-type accuracy of z (val, nearest class mean)", "%"),
                                 (axes[1], "gain", "mean PSNR gain over the rainy input (val)", "dB")):
        for arm in ARMS:
            its, values = _curve(results, arm, design.seeds, key)
            scale = 100 if key == "probe" else 1
            mean = [scale * sum(v) / len(v) for v in values]
            lo = [scale * min(v) for v in values]
            hi = [scale * max(v) for v in values]
            ax.plot(its, mean, color=colours[arm], label=labels[arm])
            ax.fill_between(its, lo, hi, color=colours[arm], alpha=0.2)
        if key == "probe":
            its, values = _curve(results, "coic", design.seeds, "probe_feat")
            ax.plot(its, [100 * sum(v) / len(v) for v in values], color=colours["coic"], linestyle="--",
                    label="CoIC, the encoder's pooled features (what InfoNCE trains)")
            ax.axhline(25, color="k", linestyle=":", linewidth=1, label="chance")
        if design.stage1_iters > 0:
            ax.axvline(design.stage1_iters, color=colours["coic"], linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"BRN demo recipe, {len(design.seeds)} seeds (line: mean, band: min–max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(design.save_path, "curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 0.5 + 0.35 * (len(rows) + 1)))
    ax.axis("off")
    cells = [[f"{v:+.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    table = ax.table(cellText=cells, colLabels=[h.replace(" ", "\n", 1) for h in header], loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.6)
    ax.set_title(summary.replace("**", ""), fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(os.path.join(design.save_path, "paired.png"), dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce.py coic_effect", formatter_class=HelpFormatter,
                                description="CoIC against the plain backbone at demo scale, paired seeds, with the "
                                            "probe of z: " + __doc__.split("\n\n")[0])
    add_list(p, "--seeds", type=int, default=[0, 1, 2, 3, 4], metavar="SEED",
             help="paired seeds, space- or comma-separated (at least 2 for an interval)")
    p.add_argument("--iters", type=int, default=600, help="training iterations of every run")
    p.add_argument("--eval_every", type=int, default=100, help="a checkpoint, a probe and a val score every N iterations")
    p.add_argument("--stage1_iters", type=int, default=0,
                   help="iterations before CoIC starts in the CoIC arm (the plain arm never starts it)")
    p.add_argument("--exemplars", default="published", choices=["query", "published"],
                   help="how the contrastive exemplars are built (train_BRN.py --exemplars)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (each gets the CPU count / jobs threads)")
    p.add_argument("--data_root", default=None, help="the demo data (default: $COIC_DEMO_ROOT or demo_data; built "
                   "if absent)")
    p.add_argument("--runs_root", default="runs/coic_effect", help="one folder per run")
    p.add_argument("--save_path", default="results/coic_effect", help="the curves and the paired table")
    p.add_argument("--only", choices=["train", "eval"], default=None,
                   help="only the trainings, or only the evaluation and outputs of finished runs")
    p.add_argument("--dry_run", action="store_true", help="print the design and every run's flags, run nothing")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the suite's smallest version
    return p


def design_from_args(args: argparse.Namespace) -> Design:
    from utils.data.demo import default_root

    for name in ("iters", "eval_every", "jobs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.eval_every > args.iters:
        raise UserError(f"--eval_every {args.eval_every} is longer than --iters {args.iters}")
    if not 0 <= args.stage1_iters < args.iters:
        raise UserError(f"--stage1_iters must be in [0, --iters), got {args.stage1_iters}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds repeats a seed: {args.seeds}")
    return Design(tuple(args.seeds), args.iters, args.eval_every, args.stage1_iters, args.data_root or default_root(),
                  args.runs_root, args.save_path, args.jobs, args.exemplars, args.tiny)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        design = design_from_args(args)
        if args.dry_run:
            print(__doc__.split("\n\n", 2)[2].split("Writes")[0].strip())
            for seed in design.seeds:
                for arm in ARMS:
                    print(f"python train_BRN.py {' '.join(train_argv(design, arm, seed))}")
            print(f"results: {design.save_path}")
            return 0
        from utils.data.demo import build_demo_data

        build_demo_data(design.data_root)
        if args.only != "eval":
            run_trainings(design)
        if args.only != "train":
            print(write_outputs(design, evaluate_runs(design)))
            print(f"-> {design.save_path}")
        return 0

    return cli_main(work)


if __name__ == "__main__":
    sys.exit(main())
