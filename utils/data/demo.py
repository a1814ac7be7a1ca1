"""Deterministic synthetic mixed-rain data built from scikit-image's sample pictures.

Four rain types, each written in the standard layout ``<root>/<type>/{train,test}/{rain,norain}``:

| type        | looks like               | streaks                                          |
|-------------|--------------------------|--------------------------------------------------|
| light       | Rain200L                 | sparse, thin, short, faint, near-vertical        |
| heavy       | Rain200H                 | dense, long, thick, bright, two layers           |
| hazy        | heavy rain with a veil   | medium streaks plus a haze veil (I = J·t + A(1-t)) |
| multiangle  | DDN-Data                 | three layers at different angles and lengths     |

Every scene is rendered under all four rain types (the same clean picture, the same file name in
each type's folder), so the same scene under two rains can be compared with two scenes under one
rain (``analysis.probe``). Three splits: ``train``; ``val`` (other crops of the training sources, at
the test size: for choices made during or after training, never the test split); ``test`` (other
source images). Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import numpy as np
import torch
from scipy.signal import fftconvolve

from utils.errors import UserError
from utils.images import resize_square, write_array
from utils.io import atomic_dir

logger = logging.getLogger(__name__)

RAIN_TYPES = ("light", "heavy", "hazy", "multiangle")
TRAIN_SOURCES = ("astronaut", "coffee", "rocket", "retina", "immunohistochemistry", "camera", "brick", "grass")
TEST_SOURCES = ("chelsea", "coins", "gravel", "hubble_deep_field")
SPLITS = ("train", "val", "test")
_DONE = ".complete"
# Bumped whenever the pictures a given set of settings produces change, so that an older folder is rebuilt.
DATA_VERSION = 2


class DemoDataExists(UserError, FileExistsError):
    """The demo root exists but holds something other than complete demo data."""


def source_picture(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def _patch(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of 1-2x ``size`` resized to ``size`` (keeps fine detail)."""
    h, w = img.shape[:2]
    side = int(min(h, w, size * rng.uniform(1.0, 2.0)))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side])).permute(2, 0, 1)
    return resize_square(crop, size).permute(1, 2, 0).numpy()


def _line_kernel(length: int, angle_deg: float, width: float) -> torch.Tensor:
    """A normalised streak kernel: a line of ``length`` px at ``angle_deg`` from vertical."""
    size = length + 4 + (length % 2 == 0)
    c = size // 2
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    t = math.radians(angle_deg)
    along = yy * math.cos(t) + xx * math.sin(t)
    across = -yy * math.sin(t) + xx * math.cos(t)
    k = torch.exp(-(across.float() ** 2) / (2 * width ** 2)) * (along.abs() <= length / 2).float()
    return k / k.sum()


def _streaks(h: int, w: int, rng: np.random.Generator, density: float, length: tuple, angle: float,
             width: float, brightness: float) -> np.ndarray:
    """One streak layer (H,W) in [0, ~brightness]: random drops smeared along a line."""
    drops = (rng.random((h, w)) < density) * rng.uniform(0.5, 1.0, (h, w))
    L = int(rng.integers(length[0], length[1] + 1))
    k = _line_kernel(L, angle, width)
    layer = np.clip(fftconvolve(drops, k.numpy(), mode="same"), 0, None)
    layer = layer / max(float(np.quantile(layer, 0.999)), 1e-6)
    return np.clip(layer, 0, 1).astype(np.float32) * brightness


def add_rain(clean: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """clean (H,W,3) in [0,1] -> rainy (H,W,3) in [0,1] with rain of type ``kind``."""
    h, w = clean.shape[:2]
    tilt = rng.uniform(-15, 15)
    if kind == "light":
        rain = _streaks(h, w, rng, 0.006, (8, 14), tilt, 0.5, rng.uniform(0.35, 0.5))
    elif kind == "heavy":
        rain = (_streaks(h, w, rng, 0.02, (22, 34), tilt, 1.0, rng.uniform(0.5, 0.65))
                + _streaks(h, w, rng, 0.012, (14, 24), tilt + rng.uniform(-5, 5), 0.8, 0.3))
    elif kind == "hazy":
        rain = _streaks(h, w, rng, 0.012, (16, 24), tilt, 0.8, rng.uniform(0.4, 0.55))
        t, a = rng.uniform(0.65, 0.8), rng.uniform(0.75, 0.9)
        clean = clean * t + a * (1 - t)
    elif kind == "multiangle":
        rain = sum(_streaks(h, w, rng, 0.008, (6, 30), rng.uniform(-40, 40), rng.uniform(0.5, 0.9),
                            rng.uniform(0.4, 0.7)) for _ in range(3))
    else:
        raise ValueError(f"unknown rain type {kind!r}; choose one of {RAIN_TYPES}")
    return np.clip(clean + rain[..., None], 0.0, 1.0)


def _write(arr: np.ndarray, path: str) -> None:
    write_array((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), path)


def default_root() -> str:
    """Where ``--demo`` keeps its data: ``$COIC_DEMO_ROOT`` or ``demo_data/``."""
    return os.environ.get("COIC_DEMO_ROOT", "demo_data")


def is_complete(root: str) -> bool:
    return os.path.isfile(os.path.join(root, _DONE))


def _settings(root: str) -> Optional[dict]:
    """The build settings a complete demo folder records (None for a folder from before they were recorded)."""
    try:
        with open(os.path.join(root, _DONE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_demo_data(root: str = "demo_data", train_per_source: int = 6, train_size: int = 96,
                    test_size: int = 288, seed: int = 0, val_per_source: int = 1) -> str:
    """Write the demo data under ``root`` unless it is already complete; returns ``root``.

    Built in a temporary folder and renamed into place, so an interrupted build leaves
    nothing half-written behind. The completion marker records the settings and the data version;
    a complete folder of another version is rebuilt, one of this version is kept whatever its sizes
    (the tests build small ones). Test and validation images are ``test_size`` pixels so that NIQE
    (at least 192 x 192) scores them with 3 x 3 blocks.
    """
    settings = {"version": DATA_VERSION, "train_per_source": train_per_source, "train_size": train_size,
                "test_size": test_size, "seed": seed, "val_per_source": val_per_source}
    if is_complete(root):
        found = _settings(root)
        if found is not None and found.get("version") == DATA_VERSION:
            return root
        logger.info("demo data in %s is from an older release; rebuilding it with %s", root, settings)
    elif os.path.exists(root) and os.listdir(root):
        raise DemoDataExists(f"{root} exists but is not a complete demo data folder; remove it or pick another path")
    sources = {name: source_picture(name) for name in TRAIN_SOURCES + TEST_SOURCES}
    plan = (("train", TRAIN_SOURCES, train_per_source, train_size),
            ("val", TRAIN_SOURCES, val_per_source, test_size),
            ("test", TEST_SOURCES, 1, test_size))
    from tqdm import tqdm

    with atomic_dir(root) as tmp:
        for kind in RAIN_TYPES:
            for split in SPLITS:
                for sub in ("rain", "norain"):
                    os.makedirs(os.path.join(tmp, kind, split, sub), exist_ok=True)
        total = sum(len(names) * per for _, names, per, _ in plan)
        with tqdm(total=total, desc="demo data", unit="scene") as bar:
            for s, (split, names, per, size) in enumerate(plan):
                i = 0
                for name in names:
                    for _ in range(per):
                        # One clean scene, then each rain type drawn from its own stream.
                        clean = _patch(sources[name], size, np.random.default_rng([seed, s, i]))
                        for t, kind in enumerate(RAIN_TYPES):
                            rainy = add_rain(clean, kind, np.random.default_rng([seed, s, i, t + 1]))
                            _write(clean, os.path.join(tmp, kind, split, "norain", f"{i:03d}.png"))
                            _write(rainy, os.path.join(tmp, kind, split, "rain", f"{i:03d}.png"))
                        i += 1
                        bar.update(1)
        with open(os.path.join(tmp, _DONE), "w") as f:
            json.dump(settings, f)
    logger.info("demo data written to %s (%d rain types)", root, len(RAIN_TYPES))
    return root


def demo_splits(root: str, split: str) -> dict[str, str]:
    """{rain type: folder of that split} for a built demo root."""
    return {kind: os.path.join(root, kind, split) for kind in RAIN_TYPES}
