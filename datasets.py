"""Rain/clean pairs on disk and the mixed training set.

A dataset folder holds ``rain/`` and ``norain/``. Pairs are found by file naming: the clean
partner of a rainy file is the first of these clean names that exists in ``norain/``
(any image extension), one rule per public dataset's convention:

| rule        | rainy name        | clean name      | dataset            |
|-------------|-------------------|-----------------|--------------------|
| same        | ``X.png``         | ``X.png``       | generic, demo data |
| x2 suffix   | ``norain-7x2.png``| ``norain-7.png``| Rain200L/H         |
| rain prefix | ``rain-007.png``  | ``norain-007.png`` | Rain800         |
| variant     | ``12_3.jpg``      | ``12.jpg``      | DDN-Data (14 rains per scene) |

Items of the training set are (rain crop, clean crop, rain resized to crop, clean resized to
crop), float tensors (3,crop,crop) in [0,1].
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# (name, pattern on the rainy stem, replacement giving the clean stem)
PAIRING_RULES = (
    ("same", re.compile(r"^(.*)$"), r"\1"),
    ("x2 suffix", re.compile(r"^(.*)x2$"), r"\1"),
    ("rain prefix", re.compile(r"^rain-(.*)$"), r"norain-\1"),
    ("variant", re.compile(r"^(.*)_\d+$"), r"\1"),
)


class DataError(ValueError):
    """A dataset folder or file that cannot be used, with what to do about it."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if is_image(f))


def find_pairs(folder: str) -> list[tuple[str, str]]:
    """(rain path, clean path) pairs of ``folder/rain`` and ``folder/norain``, sorted by name."""
    rain_dir, clean_dir = os.path.join(folder, "rain"), os.path.join(folder, "norain")
    if not os.path.isdir(folder):
        raise DataError(f"data path {folder} does not exist; pass folders that contain rain/ and norain/")
    for d in (rain_dir, clean_dir):
        if not os.path.isdir(d):
            raise DataError(f"data path {folder} has no {os.path.basename(d)}/ folder; "
                            "each data path must contain rain/ and norain/")
    clean_by_stem = {os.path.splitext(f)[0]: f for f in list_images(clean_dir)}
    pairs = []
    for name in list_images(rain_dir):
        stem = os.path.splitext(name)[0]
        partner = None
        for _, pattern, repl in PAIRING_RULES:
            if pattern.match(stem) and pattern.sub(repl, stem) in clean_by_stem:
                partner = clean_by_stem[pattern.sub(repl, stem)]
                break
        if partner is None:
            raise DataError(f"rainy image {os.path.join(rain_dir, name)} has no clean partner in {clean_dir}")
        pairs.append((os.path.join(rain_dir, name), os.path.join(clean_dir, partner)))
    if not pairs:
        raise DataError(f"data path {folder} yields no rain/clean pairs (is rain/ empty?)")
    return pairs


def read_image(path: str) -> Tensor:
    """Read any image file as RGB float (3,H,W) in [0,1] (grey, RGBA and 16-bit converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
            mode = img.mode
    except Exception as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer) and mode in ("I", "I;32"):
        arr = arr.astype(np.float32) / float(arr.max() or 1)
    else:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:  # RGBA: drop alpha (published data sets never use it)
        arr = arr[..., :3]
    elif arr.shape[2] == 2:  # grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def save_image(img: Tensor, path: str) -> None:
    """Write (3,H,W) in [0,1] as an 8-bit PNG/JPEG (rounded), atomically."""
    arr = (img.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def resize(img: Tensor, size: int) -> Tensor:
    """(3,H,W) -> (3,size,size), bilinear with antialiasing (torchvision's Resize on tensors)."""
    return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


@dataclass(frozen=True)
class SampleKey:
    """What the sampler hands the dataset: which pair and the seed of its augmentation."""
    index: int
    seed: int


class MixedRainDataset(Dataset):
    """Pairs of several dataset folders mixed into one training set.

    ``data_paths``: folders with rain/ and norain/. Item = (rain crop, clean crop, rain
    resized, clean resized), each (3,crop,crop) in [0,1]. Indexing with a ``SampleKey``
    makes the crop and flip a function of its seed (reproducible under any worker count).
    """

    def __init__(self, data_paths: Sequence[str], crop_size: int):
        self.crop_size = crop_size
        self.pairs: list[tuple[str, str]] = []
        self.sources: list[str] = []
        for path in data_paths:
            found = find_pairs(path)
            self.pairs.extend(found)
            self.sources.extend([path] * len(found))
            logger.info("%s: %d pairs", path, len(found))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if isinstance(key, SampleKey):
            index, rng = key.index, random.Random(key.seed)
        else:
            index, rng = int(key), random
        rain_path, clean_path = self.pairs[index]
        rain, clean = read_image(rain_path), read_image(clean_path)
        if rain.shape != clean.shape:
            raise DataError(f"pair sizes differ: {rain_path} is {tuple(rain.shape[1:])}, "
                            f"{clean_path} is {tuple(clean.shape[1:])}")
        p = self.crop_size
        small_rain, small_clean = resize(rain, p), resize(clean, p)
        h, w = rain.shape[-2:]
        if h < p or w < p:  # pad small images by reflection so every crop is p x p
            pad = (0, max(0, p - w), 0, max(0, p - h))
            rain = F.pad(rain[None], pad, mode="reflect" if min(h, w) > p // 2 else "replicate")[0]
            clean = F.pad(clean[None], pad, mode="reflect" if min(h, w) > p // 2 else "replicate")[0]
            h, w = rain.shape[-2:]
        top, left = rng.randint(0, h - p), rng.randint(0, w - p)
        rain = rain[:, top:top + p, left:left + p]
        clean = clean[:, top:top + p, left:left + p]
        flip = rng.randint(0, 3)  # as the reference: 1 = vertical, 2 = horizontal, else none
        if flip in (1, 2):
            rain, clean = rain.flip(flip), clean.flip(flip)
        return rain.contiguous(), clean.contiguous(), small_rain, small_clean


class EpochSampler(Sampler):
    """Shuffles once per epoch from (seed, epoch), pads to whole batches, can start mid-epoch.

    Yields ``SampleKey``s; the position in the epoch fixes the augmentation seed, so a run
    resumed at batch k sees exactly the data an uninterrupted run would.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def batches_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
        return max(1, math.ceil(num_items / (batch_size * world_size)))

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.batches_per_epoch(self.n, self.batch_size, self.world_size) * self.batch_size * self.world_size
        return [order[i % self.n] for i in range(total)]

    def __iter__(self) -> Iterator[SampleKey]:
        order = self._order()
        per_step = self.batch_size * self.world_size
        for pos in range(self.start_batch * per_step, len(order)):
            if (pos % per_step) // self.batch_size != self.rank:
                continue
            yield SampleKey(order[pos], (self.seed * 7_919 + self.epoch) * 10_000_019 + pos)

    def __len__(self) -> int:
        steps = self.batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start_batch
        return max(0, steps) * self.batch_size


def parse_data_paths(value: str) -> list[str]:
    """Split ``--data_paths a,b,c`` (spaces and empty entries ignored)."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise DataError("--data_paths is empty; pass folders with rain/ and norain/, separated by commas")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Dataset tools: build the demo data, count pairs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="write the synthetic mixed-rain demo data")
    demo.add_argument("root", nargs="?", default="demo_data")
    count = sub.add_parser("pairs", help="count the rain/clean pairs of folders")
    count.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "demo":
        from utils.demo_data import build_demo_data

        build_demo_data(args.root)
    else:
        for folder in args.folders:
            print(f"{folder}: {len(find_pairs(folder))} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
