"""CoI-M kernel temperature per layer: how strongly each modulated layer reshapes its kernels.

    python -m analysis.modulation_temperature --test_model CKPT [--feat_ext ENCODER] \
        --data_paths datasets/Rain800/test datasets/Rain200H/test --num_images 100

For every image and every modulated layer (1x1 layers are never modulated), with the layer's
generator outputs a (C_out), b (C_in/g), c (k²) for that image, the temperature of the softmax
over the kernel taps is ``T = (1 / sigmoid(a_o + b_i)) / (mean(c - min c) + 1e-8)`` and the
layer's value is ``mean(log T)`` (the published ``Analysis/temperature_analysis.py``). Small:
a sharp softmax, strong modulation; large: nearly flat kernels. Values are collected by forward
hooks on the CoI-M layers, so every backbone is covered without touching its forward.

Writes ``temperature_layers.csv`` (dataset, layer, module, mean, std, n), ``temperature.md``
(per dataset: mean over layers; the layers whose value differs most between datasets) and
``temperature.png`` (mean log T per layer, one line per dataset, ±std band).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


import torch
import torch.nn as nn
from torch import Tensor

from analysis.common import (
    AnalysisError,
    add_output_args,
    add_restore_args,
    check_labels,
    dataset_colours,
    dataset_images,
    markdown_table,
    new_figure,
    run_tool,
    sample,
    save_figure,
    split_paths,
    write_csv,
    write_text,
)
from models import size_multiple, tile_size
from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, log_temperature
from utils.cli import Parser, add_alias, add_list

COLUMNS = ["dataset", "layer", "module", "mean", "std", "n"]


def modulated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every CoI-M layer that modulates (k > 1, with a generator), in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (ModulatedConv2d, ModulatedConvTranspose2d)) and m.modulated]


class TemperatureProbe:
    """Forward hooks that record each modulated layer's mean log T, in the order layers run."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): name for name, m in modulated_layers(model)}
        self.records: list[tuple[str, Tensor]] = []
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for _, m in modulated_layers(model)]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0]
        z = args[1] if len(args) > 1 else kwargs.get("z")
        if z is None:
            return
        with torch.no_grad():
            self.records.append((self.names[id(module)], log_temperature(*module.modulation_codes(x, z)).float()))

    def take(self) -> list[tuple[str, Tensor]]:
        records, self.records = self.records, []
        return records

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def layer_temperatures(model: nn.Module, x: Tensor, z: Optional[Tensor]) -> list[tuple[str, float]]:
    """[(module name, mean log T)] of one image x (1,3,H,W), layers in the order they ran."""
    if z is None:
        raise AnalysisError("the modulation temperature needs a code z: load a CoIC checkpoint with its encoder "
                            "(a model run with z=None is not modulated)")
    if not modulated_layers(model):
        raise AnalysisError(f"{type(model).__name__} has no modulated CoI-M layer (trained without CoIC?)")
    probe = TemperatureProbe(model)
    try:
        model(x, z)
        return [(name, float(v[0])) for name, v in probe.take()]
    finally:
        probe.close()


def summarise(per_image: dict[str, list[list[tuple[str, float]]]]) -> list[dict]:
    """Rows of ``COLUMNS``: per dataset and layer position, mean/std of the per-image values."""
    rows = []
    for label, images in per_image.items():
        values = torch.tensor([[v for _, v in image] for image in images], dtype=torch.float64)
        names = [n for n, _ in images[0]]
        std = values.std(0, unbiased=False) if len(images) > 1 else torch.zeros(values.shape[1], dtype=torch.float64)
        for layer, name in enumerate(names):
            rows.append({"dataset": label, "layer": layer, "module": name, "mean": float(values[:, layer].mean()),
                         "std": float(std[layer]), "n": len(images)})
    return rows


def summary_markdown(rows: list[dict], top: int = 5) -> str:
    labels = list(dict.fromkeys(r["dataset"] for r in rows))
    per = [[lab, sum(r["mean"] for r in rows if r["dataset"] == lab) / sum(r["dataset"] == lab for r in rows)]
           for lab in labels]
    text = "Mean log T over layers (smaller: stronger modulation)\n\n" + markdown_table(["dataset", "mean log T"], per)
    if len(labels) > 1:
        layers = sorted({(r["layer"], r["module"]) for r in rows})
        spread = []
        for layer, name in layers:
            means = [r["mean"] for r in rows if r["layer"] == layer]
            spread.append([layer, name, max(means) - min(means)])
        spread.sort(key=lambda r: -r[2])
        text += "\n\nLayers that differ most between datasets (max - min of the mean log T)\n\n"
        text += markdown_table(["layer", "module", "spread"], spread[:top])
    return text + "\n"


def plot(rows: list[dict], path: str) -> None:
    labels = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = new_figure(8, 4)
    ax = fig.add_subplot()
    for colour, label in zip(dataset_colours(len(labels)), labels):
        mine = [r for r in rows if r["dataset"] == label]
        x = [r["layer"] for r in mine]
        mean = torch.tensor([r["mean"] for r in mine])
        std = torch.tensor([r["std"] for r in mine])
        ax.plot(x, mean.tolist(), color=colour, label=label, linewidth=1.2)
        ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("modulated layer (forward order)")
    ax.set_ylabel("mean log T")
    ax.set_title("CoI-M kernel temperature per layer")
    ax.legend(loc="best", fontsize=8, frameon=False)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="CoI-M kernel temperature per modulated layer and dataset (CSV, Markdown, plot).")
    p.add_argument("--test_model", required=True, help="a CoIC checkpoint (ours, or the published model file)")
    add_alias(p, "--checkpoint", "--test_model")
    p.add_argument("--feat_ext", default=None, help="encoder file when it is not inside --test_model")
    add_alias(p, "--encoder", "--feat_ext")
    add_list(p, "--data_paths", required=True, metavar="PATH",
             help="dataset folders (their rain/ images, or the images directly), space- or comma-separated")
    add_list(p, "--labels", default=None, metavar="NAME",
             help="one name per data path (default: from the paths)")
    p.add_argument("--num_images", type=int, default=100, help="images per dataset, drawn with --seed (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    add_restore_args(p)
    add_output_args(p, "analysis_results/modulation_temperature")
    return p


def run(args: argparse.Namespace, device: torch.device) -> str:
    from tqdm import tqdm

    from utils.checkpoint import read_checkpoint
    from utils.eval.evaluation import load_encoder, load_model
    from utils.eval.inference import image_code
    from utils.images import read_image
    from utils.tiling import pad_to_multiple

    paths = split_paths(args.data_paths)
    labels = check_labels(args.labels, paths)
    ckpt = read_checkpoint(args.test_model)
    name = ckpt.get("model_name", args.model_name) if isinstance(ckpt, dict) else args.model_name
    del ckpt
    model, model_ckpt = load_model(name, args.test_model, "tran", device)
    encoder = load_encoder(args.feat_ext, model_ckpt, args.test_model, device)
    per_image: dict[str, list] = {}
    for label, folder in zip(labels, paths):
        images = sample(dataset_images(folder), args.num_images, args.seed)
        for path in tqdm(images, desc=f"temperature {label}", unit="img", dynamic_ncols=True):
            x = read_image(path).unsqueeze(0).to(device)
            with torch.no_grad():
                z = image_code(encoder, x)
            x = pad_to_multiple(x, size_multiple(model))
            tile = tile_size(model)
            if tile is not None:  # IDT runs at its training size only: the top-left tile stands for the image
                x = x[..., :tile, :tile] if min(x.shape[-2:]) >= tile else torch.nn.functional.interpolate(
                    x, size=(tile, tile), mode="bilinear", align_corners=False)
            per_image.setdefault(label, []).append(layer_temperatures(model, x, z))
    rows = summarise(per_image)
    os.makedirs(args.save_path, exist_ok=True)
    write_csv(os.path.join(args.save_path, "temperature_layers.csv"), COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    md = summary_markdown(rows)
    write_text(os.path.join(args.save_path, "temperature.md"), f"{name}, {args.test_model}\n\n" + md)
    plot(rows, os.path.join(args.save_path, "temperature.png"))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
