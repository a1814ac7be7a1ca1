"""Model cost: parameters, MACs and latency of each backbone, without and with CoIC.

    python -m analysis.model_cost --save_path analysis_results/cost            # 512x512, all five
    python -m analysis.model_cost --models BRN RCDNet --size 128 --hparams BRN.inter_iter=2
    python -m analysis.model_cost --demo_hparams --size 64                       # the --demo configurations

Per backbone (reference hyper-parameters, or the ``--demo`` runs' with ``--demo_hparams``; then
``--hparams MODEL.key=value`` overrides):

- parameters of the backbone proper, of its CoI-M generators, of its context embeddings
  (IDT, DRSformer) and of the encoder (one RainDetailEncoder: inference runs only the key
  encoder; training holds a second, EMA copy of it);
- MACs of restoring one ``--size`` x ``--size`` image, counted by PyTorch's own FLOP counter
  (``torch.utils.flop_counter``, convolutions and matrix products; MACs = FLOPs / 2) on meta
  tensors (no computation), in the plain mode (z = None) and the modulated mode (encoder on the
  128x128 resize + modulated backbone);
- latency on the device (the CPU, or the GPU with ``--use_GPU``) in both modes: the median of ``--reps`` timed runs after ``--warmup``
  (the two modes alternate, so a shared machine's varying load affects both alike; CPU
  numbers on a busy machine are still only indicative).

Costs are those of ``utils.eval.inference.restore``, i.e. of evaluation: an IDT (which only works at
its 128x128 training size) is counted over its tiles, without overlap unless ``--tile_overlap``.
Writes ``cost.csv``, ``cost.md`` and ``cost.png``.
"""
from __future__ import annotations

import argparse
import ast
import copy
import functools
import math
import os
import statistics
import time
from typing import Any, Callable, Optional, Sequence


import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from analysis.common import (
    AnalysisError,
    add_output_args,
    logger,
    markdown_table,
    new_figure,
    run_tool,
    save_figure,
    write_csv,
    write_text,
)
from models import available_models, build_encoder, build_model
from models.coim import context_embedding_parameters, modulation_parameters
from utils.cli import Parser, add_list
from utils.eval.inference import ENCODER_SIZE, image_code, restore

COLUMNS = ["model", "hparams", "backbone_params", "coim_generator_params", "context_embedding_params",
           "encoder_params", "macs_normal_G", "macs_modulated_G", "macs_encoder_G", "latency_normal_ms",
           "latency_modulated_ms"]


def count_parameters(model: nn.Module, encoder: Optional[nn.Module] = None) -> dict[str, int]:
    """Parameter counts: backbone proper, CoI-M generators, context embeddings, encoder.

    The CoIC parts are found by module type (as the optimiser split does); the backbone is
    everything else in ``model``. ``encoder``: a ContrastiveEncoder (its query encoder is
    counted) or any module (counted whole).
    """
    generators = {id(p): p.numel() for p in modulation_parameters(model)}
    context = {id(p): p.numel() for p in context_embedding_parameters(model) if id(p) not in generators}
    total = sum(p.numel() for p in model.parameters())
    if encoder is None:
        enc = 0
    else:
        enc = sum(p.numel() for p in getattr(encoder, "encoder_q", encoder).parameters())
    return {"backbone_params": total - sum(generators.values()) - sum(context.values()),
            "coim_generator_params": sum(generators.values()), "context_embedding_params": sum(context.values()),
            "encoder_params": enc}


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of one call of ``fn`` (PyTorch's FLOP counter: FLOPs / 2), run without grad."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() // 2


def latency_ms(fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Median wall time in ms of each of ``fns`` over ``reps`` calls, after ``warmup`` calls (nan if reps=0).

    The functions are timed in turn within each repetition rather than one after the other, so
    a load that comes and goes on a shared machine affects every mode alike.
    """
    if reps <= 0:
        return [float("nan")] * len(fns)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for i in range(warmup + reps):
            for fn, record in zip(fns, times):
                sync()
                start = time.perf_counter()
                fn()
                sync()  # CUDA runs asynchronously: time the work, not the launch
                if i >= warmup:
                    record.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in times]


def parse_hparams(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["BRN.inter_iter=2", "DRSformer.num_blocks=[1,1,1,1]"]`` -> {"BRN": {"inter_iter": 2}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise AnalysisError(f"--hparams {item!r}: expected MODEL.name=value, e.g. BRN.inter_iter=2")
        if model not in available_models():
            raise AnalysisError(f"--hparams {item!r}: unknown model {model!r}; choose one of: "
                                f"{', '.join(available_models())}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a bare word (e.g. a path) stays a string
        out.setdefault(model, {})[name] = parsed
    return out


def restore_macs(model: nn.Module, encoder: Optional[nn.Module], size: int, overlap: int) -> tuple[int, int]:
    """MACs of restoring one size x size image: (plain, modulated incl. the encoder); modulated is -1 without encoder.

    Counted on meta-device copies of the modules: shapes propagate and nothing is computed, so a
    512x512 count is as cheap as a 64x64 one and leaves the device alone. A backbone whose
    forward needs real values (none of ours does) is counted on a real run instead.
    """
    def both(m: nn.Module, e: Optional[nn.Module], x: torch.Tensor) -> tuple[int, int]:
        plain = count_macs(lambda: restore(m, x, None, overlap=overlap))
        modulated = count_macs(lambda: restore(m, x, image_code(e, x), overlap=overlap)) if e is not None else -1
        return plain, modulated

    try:
        twin = copy.deepcopy(model).to("meta")
        return both(twin, copy.deepcopy(encoder).to("meta") if encoder is not None else None,
                    torch.empty(1, 3, size, size, device="meta"))
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("%s: counting MACs on real tensors (%s)", type(model).__name__, " ".join(str(exc).split())[:120])
        device = next(model.parameters()).device
        return both(model, encoder, torch.rand(1, 3, size, size, device=device))


@functools.lru_cache(maxsize=None)
def encoder_macs(dim: int) -> int:
    """MACs of computing z: the encoder on the 128x128 resize, whatever the input size (counted once per dim)."""
    encoder = build_encoder(dim=dim).to("meta").eval()
    return count_macs(lambda: image_code(encoder, torch.empty(1, 3, ENCODER_SIZE, ENCODER_SIZE, device="meta")))


def demo_hparams(name: str) -> dict[str, Any]:
    """The model hyper-parameters of ``train_<name>.py --demo`` (small, CPU-sized configurations)."""
    from types import SimpleNamespace

    from utils.train.recipes import get_recipe

    recipe = get_recipe(name)
    values = {k: f.default for k, f in recipe.flags.items()}
    values["crop_size"] = recipe.crop_size
    values.update(recipe.demo)
    hparams = {k: values[k] for k, f in recipe.flags.items() if f.model and not f.init_only and k in recipe.demo}
    if recipe.derived_hparams is not None:  # e.g. IDT's size follows the (demo) crop
        hparams.update(recipe.derived_hparams(SimpleNamespace(**values)))
    return hparams


def measure(name: str, hparams: dict, size: int, dim_in: int, device: torch.device, warmup: int, reps: int,
            overlap: int, step: Callable[[str], None] = lambda s: None) -> dict:
    """One row of the cost table for backbone ``name`` built with ``hparams`` (and ``dim_in``)."""
    model = build_model(name, **{"dim_in": dim_in, **hparams}).to(device).eval()
    encoder = build_encoder(dim=dim_in).to(device).eval() if dim_in > 0 else None
    row: dict[str, Any] = {"model": name, "hparams": " ".join(f"{k}={v}" for k, v in hparams.items())}
    row.update(count_parameters(model, encoder))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def plain() -> None:
        restore(model, x, None, overlap=overlap)

    def modulated() -> None:
        restore(model, x, image_code(encoder, x), overlap=overlap)

    step("MACs")
    plain_macs, modulated_macs = restore_macs(model, encoder, size, overlap)
    row["macs_normal_G"] = plain_macs / 1e9
    row["macs_modulated_G"] = modulated_macs / 1e9 if encoder is not None else math.nan
    row["macs_encoder_G"] = encoder_macs(dim_in) / 1e9 if encoder is not None else math.nan
    step("latency")
    if encoder is not None:
        row["latency_normal_ms"], row["latency_modulated_ms"] = latency_ms([plain, modulated], device, warmup, reps)
    else:
        row["latency_normal_ms"], row["latency_modulated_ms"] = latency_ms([plain], device, warmup, reps)[0], math.nan
    return row


def plot(rows: Sequence[dict], path: str, size: int, device: torch.device) -> None:
    import numpy as np

    names = [r["model"] for r in rows]
    pos = np.arange(len(rows))
    fig = new_figure(11.0, 4.5)
    axes = fig.subplots(1, 2)
    for ax, key, unit in ((axes[0], "macs", "GMACs"), (axes[1], "latency", "ms")):
        suffix = "_G" if key == "macs" else "_ms"
        ax.bar(pos - 0.2, [r[f"{key}_normal{suffix}"] for r in rows], 0.4, label="plain (z = None)")
        ax.bar(pos + 0.2, [r[f"{key}_modulated{suffix}"] for r in rows], 0.4, label="CoIC (encoder + modulated)")
        ax.set_xticks(pos, labels=names)
        ax.set_ylabel(unit)
    axes[0].set_title(f"MACs at {size}x{size}")
    axes[1].set_title(f"latency on {device}")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Parameters, MACs and latency of each backbone, without and with CoIC.")
    add_list(p, "--models", default=available_models(), metavar="NAME",
             help="backbones to measure, space- or comma-separated (default: every registered one)")
    p.add_argument("--size", type=int, default=512, help="input height and width")
    p.add_argument("--hparams", nargs="*", default=[],
                   help="hyper-parameter overrides as MODEL.name=value (e.g. BRN.inter_iter=2 DRSformer.dim=16)")
    p.add_argument("--demo_hparams", action="store_true",
                   help="start from the small configurations of the --demo runs instead of the reference ones")
    p.add_argument("--dim_in", type=int, default=128, help="dimension of z (0: plain backbones, no CoIC columns)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--reps", type=int, default=5, help="timed runs per mode (0: skip latency)")
    p.add_argument("--tile_overlap", type=int, default=0, help="tile overlap for backbones that always tile (IDT)")
    add_output_args(p, "analysis_results/cost")
    return p


def run(args: argparse.Namespace, device: torch.device) -> str:
    from tqdm import tqdm

    unknown = [m for m in args.models if m not in available_models()]
    if unknown:
        raise AnalysisError(f"unknown --models {', '.join(unknown)}; choose from: {', '.join(available_models())}")
    if args.size < 8 or args.warmup < 0 or args.reps < 0:
        raise AnalysisError("--size must be at least 8 and --warmup/--reps non-negative")
    overrides = parse_hparams(args.hparams)
    rows = []
    with tqdm(args.models, desc="model cost", unit="model", dynamic_ncols=True) as bar:
        for name in bar:
            hparams = {**(demo_hparams(name) if args.demo_hparams else {}), **overrides.get(name, {})}
            rows.append(measure(name, hparams, args.size, args.dim_in, device, args.warmup, args.reps,
                                args.tile_overlap, step=lambda s, n=name: bar.set_postfix_str(f"{n}: {s}")))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    os.makedirs(args.save_path, exist_ok=True)
    write_csv(os.path.join(args.save_path, "cost.csv"), COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    md = markdown_table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows], digits=2)
    write_text(os.path.join(args.save_path, "cost.md"),
               f"Input {args.size}x{args.size}, device {device}, z dimension {args.dim_in}; MACs in G "
               "(modulated = encoder + modulated backbone), latency = median in ms\n\n" + md)
    plot(rows, os.path.join(args.save_path, "cost.png"), args.size, device)
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
