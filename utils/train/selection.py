"""Choose a run's checkpoint by its worst dataset: the one whose least-helped rain type gains most.

A small model trained briefly on mixed rain swings between its types from one checkpoint to the
next (the demo's BRN: light rain from -5.4 to +1.4 dB within 150 iterations, docs/demo.md), and the
last checkpoint is wherever the swing stopped. ``select_checkpoint`` scores each candidate on a few
pictures of each training set (never the test split) and keeps the one whose worst set gains most
over its rainy input: a model for mixed rain should not make any kind of rain worse.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from utils.data.layouts import find_pairs
from utils.images import read_image
from utils.metrics import psnr

__all__ = ["checkpoint_gains", "select_checkpoint", "most_even", "validation_pairs"]


def validation_pairs(folders: Mapping[str, str], per_set: int) -> dict[str, list[tuple[str, str]]]:
    """``per_set`` (rain, clean) pairs of each folder, spread evenly over its sorted pairs."""
    chosen = {}
    for name, folder in folders.items():
        pairs = find_pairs(folder)
        step = max(1, len(pairs) // per_set)
        chosen[name] = pairs[::step][:per_set]
    return chosen


def checkpoint_gains(path: str, model_name: str, pairs: Mapping[str, Sequence[tuple[str, str]]],
                     device: torch.device, cache: Optional[dict] = None) -> dict[str, float]:
    """Mean PSNR gain (dB: derained minus rainy, the "coic" protocol's PSNR) of checkpoint ``path``
    (CoIC when it has an encoder) on each named list of (rain, clean) pairs. ``cache``: the decoded
    pictures and their rainy PSNR, shared between checkpoints."""
    from utils.eval.evaluation import load_encoder, load_model
    from utils.eval.inference import image_code, restore

    cache = {} if cache is None else cache
    model, ckpt = load_model(model_name, path, "tran", device)
    encoder = load_encoder(None, ckpt, path, device)
    gains = {}
    with torch.inference_mode():
        for name, items in pairs.items():
            total = 0.0
            for item in items:
                item = tuple(item)
                if item not in cache:
                    rain, clean = read_image(item[0]), read_image(item[1])
                    cache[item] = (rain, clean, psnr(rain, clean))
                rain, clean, rainy_psnr = cache[item]
                x = rain.unsqueeze(0).to(device)
                z = image_code(encoder, x) if encoder is not None else None
                y = restore(model, x, z)[0].float().cpu()
                total += psnr(y, clean) - rainy_psnr
            gains[name] = total / len(items)
    return gains


def most_even(gains: Mapping[str, Mapping[str, float]]) -> str:
    """The key of ``gains`` (checkpoint -> set -> gain) whose smallest gain is largest; a tie goes
    to the later key (the longer-trained checkpoint)."""
    if not gains:
        raise ValueError("most_even: no checkpoints to choose from")
    best = None
    for key, by_set in gains.items():
        if best is None or min(by_set.values()) >= min(gains[best].values()):
            best = key
    return best


def select_checkpoint(paths: Sequence[str], model_name: str, folders: Mapping[str, str], device: torch.device,
                      per_set: int = 8) -> tuple[str, dict[str, dict[str, float]]]:
    """The checkpoint of ``paths`` (oldest first) whose worst set in ``folders`` gains most, and every
    candidate's gains (checkpoint file name -> set -> dB)."""
    pairs = validation_pairs(folders, per_set)
    cache: dict = {}
    gains = {path: checkpoint_gains(path, model_name, pairs, device, cache) for path in paths}
    best = most_even(gains)
    return best, {os.path.basename(p): g for p, g in gains.items()}
