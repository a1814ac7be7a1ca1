"""The mixed training set: sample keys, the per-epoch mix of real and synthetic rain, the epoch
sampler, the image cache, ``--data_paths``.

The rooms around it: folder layouts and pairing in ``utils.data.layouts``, the public datasets'
table in ``utils.data.specs``, reading and writing images in ``utils.images``, and the
dataset commands in ``utils.data.cli`` (``prepare`` in ``utils.data.prepare``, ``check`` in
``utils.data.check``). The names other code imported from here are re-exported below.

Command line (a thin forward to ``utils.data.cli``)::

    python datasets.py prepare rain800|did RAW OUT   # split stacked pairs (and merge DID's densities)
    python datasets.py check ROOT                     # pairs vs official counts, unpaired, unreadable
    python datasets.py pairs FOLDER...                # count the pairs of folders
    python datasets.py demo [ROOT]                    # write the synthetic demo data
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from utils import images
from utils.data.check import CheckResult, check_root, check_split, format_check  # noqa: F401 (re-exported)
from utils.data.layouts import (  # noqa: F401
    PAIRING_RULES,
    FolderScan,
    PairRule,
    find_pairs,
    require_pairs,
    scan_folder,
    stacked_pairs,
)
from utils.data.prepare import prepare  # noqa: F401
from utils.data.specs import DATASET_SPECS, DatasetSpec, dataset_spec, find_dataset_folder  # noqa: F401
from utils.errors import DataError
from utils.host import available_memory
from utils.images import (  # noqa: F401
    IMAGE_EXTENSIONS,
    StackedHalf,
    UnreadableImageError,
    is_image,
    list_images,
    read_image,
    read_pair,
    resize_square,
    save_image,
    split_stacked,
)

logger = logging.getLogger(__name__)


class TrainItem(NamedTuple):
    """What the training dataset yields (and the DataLoader batches), each (3,crop,crop) in [0,1]."""
    rain: Tensor  # rainy crop
    clean: Tensor  # its clean partner (same crop, same flip)
    query: Tensor  # the whole rainy image resized: what the encoder sees
    query_clean: Tensor  # the whole clean image resized: the exemplars are built on it


@dataclass(frozen=True)
class SampleKey:
    """What the sampler hands the dataset: everything an item depends on.

    ``index``: position in the epoch's mix; ``seed``: seed of its crop and flip; ``epoch`` and
    ``mix_seed``: which real pairs the epoch's mix holds (``MixedRainDataset.epoch_pairs``).
    Carrying the epoch in the key lets one set of DataLoader workers serve every epoch.
    """
    index: int
    seed: int
    epoch: int = 0
    mix_seed: int = 0


class _SharedCounter:
    """An integer in shared memory, so skips counted in DataLoader workers are seen here.

    No lock: a lock made in one start-method context cannot travel to workers of another
    (fork vs spawn), and a lost update needs two workers skipping in the same instant.
    """

    def __init__(self, value: int = 0):
        self._value = multiprocessing.Value("q", value, lock=False)

    def add(self, n: int = 1) -> None:
        self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        # Handing the shared value to a starting worker keeps it shared; any other pickling
        # (deepcopy, saving) gets a plain copy, since shared memory can only travel at spawn.
        if get_spawning_popen() is not None:
            return {"shared": self._value}
        return {"plain": self.value}

    def __setstate__(self, state: dict) -> None:
        self._value = state["shared"] if "shared" in state else multiprocessing.Value("q", state["plain"], lock=False)


MAX_CONSECUTIVE_SKIPS = 100  # then the data is broken, not a stray file: stop instead of scanning it all
CACHE_MEMORY_FRACTION = 0.8  # --cache_images refuses above this share of the available memory
_CACHE_SIZE_SAMPLE = 1000  # headers read to estimate the cache's size (all of them when fewer)
_KEPT_DRAWS = 4  # per-epoch real-pair draws kept per process (a rollback may revisit an epoch)


def estimate_decoded_bytes(paths: Sequence[str], sample: int = _CACHE_SIZE_SAMPLE) -> int:
    """Estimated bytes of all ``paths`` decoded (headers of at most ``sample`` evenly spaced files)."""
    picked = list(paths)[::max(1, math.ceil(len(paths) / sample))]
    sizes = []
    for path in picked:
        try:
            sizes.append(images.read_header(path).native_bytes)
        except UnreadableImageError:  # the decoding pass names it
            pass
    return int(sum(sizes) / len(sizes) * len(paths)) if sizes else 0


class MixedRainDataset(Dataset):
    """Pairs of several dataset folders mixed into one training set.

    ``data_paths``: folders in any layout of ``scan_folder`` (``rain/`` + ``norain/``, SPA's
    ``real_world/`` + ``real_world_gt/`` tree, SPA's test ``rain/`` + ``gt/``). Folders of
    real rain (SPA) are recognised from their contents.

    Mixing real and synthetic rain (the paper's recipe): every epoch uses all synthetic pairs
    plus as many real pairs as there are synthetic ones, drawn without replacement per epoch
    (all real pairs when there are fewer), so real rain neither floods nor vanishes from the
    mix and ``len(self)`` is the same every epoch. With only real folders every real pair is
    used. The draw is a function of (epoch, mix seed) only, made lazily (and cached) in
    whichever process reads the item, so DataLoader workers that live across epochs need no
    new copy of the dataset: ``epoch_pairs(epoch, seed)`` lists an epoch's mix.

    Item = (rain crop, clean crop, rain resized, clean resized), each (3,crop,crop) in [0,1].
    Indexing with a ``SampleKey`` makes the item a function of the key alone (same under any
    worker count); an integer index reads the mix of epoch 0, seed 0, with a random crop.

    ``strict=False``: an image that cannot be decoded (corrupt, truncated) is skipped with a
    warning naming the file, counted in ``self.skipped`` (also across DataLoader workers), and
    the next pair (index + 1, same augmentation seed) is returned instead. ``strict=True``
    raises ``DataError`` naming the file. Pairs of different sizes always raise.

    ``cache_images()`` decodes every image once and keeps it in memory (see there).

    ``channel_shuffle=True`` applies one random permutation of the colour channels to all four
    images of an item, so that a model cannot learn a colour bias from a few warm-toned sources
    (the demo's recipe; the paper's recipes leave colours as they are).
    """

    def __init__(self, data_paths: Sequence[str], crop_size: int, strict: bool = False,
                 channel_shuffle: bool = False):
        self.crop_size = crop_size
        self.strict = strict
        self.channel_shuffle = channel_shuffle
        self.synthetic_pairs: list[tuple[str, str]] = []
        self.synthetic_sources: list[str] = []
        self.real_pairs: list[tuple[str, str]] = []
        self.real_sources: list[str] = []
        for path in data_paths:
            scan = scan_folder(path)
            found = require_pairs(scan)
            if scan.real:
                self.real_pairs.extend(found)
                self.real_sources.extend([path] * len(found))
            else:
                self.synthetic_pairs.extend(found)
                self.synthetic_sources.extend([path] * len(found))
            logger.info("%s: %d pairs (%s%s)", path, len(found), scan.layout, ", real rain" if scan.real else "")
        n_syn, n_real = len(self.synthetic_pairs), len(self.real_pairs)
        self._draws_real = n_syn > 0 and n_real > n_syn
        self._len = n_syn + (n_syn if self._draws_real else n_real)
        self._draws: dict[tuple[int, int], np.ndarray] = {}
        self._skipped = _SharedCounter()
        self._images: Optional[dict[str, tuple[np.ndarray, str]]] = None  # path -> (images.decode_native result)
        self._unreadable: dict[str, str] = {}  # path -> why, found while caching

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far (in this process and its DataLoader workers)."""
        return self._skipped.value

    # -------------------------------------------------------------- the per-epoch mix
    def real_draw(self, epoch: int, seed: int) -> np.ndarray:
        """Indices into ``real_pairs`` used in ``epoch``, sorted; a function of (epoch, seed) only."""
        if not self._draws_real:
            return np.arange(len(self.real_pairs))
        key = (epoch, seed)
        draw = self._draws.get(key)
        if draw is None:
            rng = np.random.default_rng(np.random.SeedSequence([seed % 2 ** 63, epoch % 2 ** 63, 0x5BA]))
            draw = np.sort(rng.choice(len(self.real_pairs), size=len(self.synthetic_pairs), replace=False))
            if len(self._draws) >= _KEPT_DRAWS:
                self._draws.pop(next(iter(self._draws)))
            self._draws[key] = draw
        return draw

    def epoch_pairs(self, epoch: int = 0, seed: int = 0) -> list[tuple[str, str]]:
        """The (rain, clean) paths of ``epoch``'s mix: all synthetic pairs, then that epoch's real ones."""
        return self.synthetic_pairs + [self.real_pairs[i] for i in self.real_draw(epoch, seed)]

    def epoch_sources(self, epoch: int = 0, seed: int = 0) -> list[str]:
        """The data folder of each pair of ``epoch_pairs(epoch, seed)``."""
        return self.synthetic_sources + [self.real_sources[i] for i in self.real_draw(epoch, seed)]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The mix of epoch 0, seed 0: what an integer index reads."""
        return self.epoch_pairs(0, 0)

    def _pair_at(self, index: int, epoch: int, seed: int) -> tuple[str, str]:
        n_syn = len(self.synthetic_pairs)
        if index < n_syn:
            return self.synthetic_pairs[index]
        return self.real_pairs[int(self.real_draw(epoch, seed)[index - n_syn])]

    def __len__(self) -> int:
        return self._len

    # -------------------------------------------------------------- the image cache
    def cache_images(self, progress: bool = True, memory_fraction: float = CACHE_MEMORY_FRACTION) -> None:
        """Decode every training image once and keep it in memory as the file holds it (8-bit: uint8).

        All pairs are cached, real ones included: over a run every real pair may be drawn.
        Call it in the main process before DataLoader workers start: forked workers (the Linux
        default) share the cache copy-on-write; spawned ones (macOS, Windows) get a copy each,
        as does every process under torchrun. Refuses (``DataError``, one line) when the
        estimated size exceeds ``memory_fraction`` of ``available_memory()``. An unreadable
        image raises ``DataError`` under ``strict``; otherwise it is logged here and skipped
        like an uncached one whenever an item needs it.
        """
        from tqdm import tqdm

        paths = list(dict.fromkeys(str(p) for pair in self.synthetic_pairs + self.real_pairs for p in pair))
        need, available = estimate_decoded_bytes(paths), available_memory()
        if available is None:
            logger.warning("--cache_images: cannot tell the available memory (no /proc/meminfo); caching about "
                           "%.2f GiB unchecked", need / 2 ** 30)
        elif need > memory_fraction * available:
            raise DataError(f"--cache_images needs about {need / 2 ** 30:.2f} GiB for {len(paths)} decoded images, "
                            f"more than {memory_fraction:.0%} of the {available / 2 ** 30:.2f} GiB of memory "
                            "available; train without --cache_images")
        cached: dict[str, tuple[np.ndarray, str]] = {}
        unreadable: dict[str, str] = {}
        for path in tqdm(paths, desc="caching images", unit="img", disable=not progress, dynamic_ncols=True):
            try:
                arr, mode = images.decode_native(path)
            except UnreadableImageError as exc:
                if self.strict:
                    raise DataError(f"{exc} (training with strict data checking)") from None
                logger.warning("cannot cache unreadable training image %s; its pairs will be skipped", exc.path)
                unreadable[path] = str(exc)
                continue
            # An array owning its own buffer: forked workers then share the pixel pages untouched.
            cached[path] = (np.array(arr, copy=True), mode)
        self._images, self._unreadable = cached, unreadable
        logger.info("cached %d training images (%.2f GiB)", len(cached),
                    sum(a.nbytes for a, _ in cached.values()) / 2 ** 30)

    def _decode_cached(self, path: str) -> np.ndarray:
        """float32 (H,W,3) in [0,1] of ``path``, from the image cache when there is one."""
        if self._images is not None:
            if path in self._images:
                return images.to_float_rgb(*self._images[path])
            if path in self._unreadable:
                raise UnreadableImageError(self._unreadable[path], path)
        return images.decode_float(path)

    # -------------------------------------------------------------- items
    def __getitem__(self, key) -> TrainItem:
        if isinstance(key, SampleKey):
            index, rng, epoch, mix_seed = key.index, random.Random(key.seed), key.epoch, key.mix_seed
        else:
            index, rng, epoch, mix_seed = int(key), random, 0, 0
        n = len(self)
        for attempt in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            rain_path, clean_path = self._pair_at((index + attempt) % n, epoch, mix_seed)
            try:
                rain, clean = read_pair(rain_path, clean_path, self._decode_cached)
            except UnreadableImageError as exc:
                if self.strict:
                    raise DataError(f"{exc} (training with strict data checking)") from None
                self._skipped.add()
                logger.warning("skipping unreadable training image (%s); using the next pair instead", exc)
                continue
            return self._augment(rain, clean, rng)
        raise DataError(f"{min(n, MAX_CONSECUTIVE_SKIPS)} unreadable training pairs in a row from "
                        f"{self._pair_at(index % n, epoch, mix_seed)[0]}; check the data with: "
                        "python datasets.py check ROOT")

    def _augment(self, rain: Tensor, clean: Tensor, rng) -> TrainItem:
        p = self.crop_size
        small_rain, small_clean = resize_square(rain, p), resize_square(clean, p)
        h, w = rain.shape[-2:]
        if h < p or w < p:  # pad small images by reflection so every crop is p x p
            pad = (0, max(0, p - w), 0, max(0, p - h))
            mode = "reflect" if min(h, w) > p // 2 else "replicate"
            rain = F.pad(rain[None], pad, mode=mode)[0]
            clean = F.pad(clean[None], pad, mode=mode)[0]
            h, w = rain.shape[-2:]
        top, left = rng.randint(0, h - p), rng.randint(0, w - p)
        rain = rain[:, top:top + p, left:left + p]
        clean = clean[:, top:top + p, left:left + p]
        flip = rng.randint(0, 3)  # as the reference: 1 = vertical, 2 = horizontal, else none
        if flip in (1, 2):
            rain, clean = rain.flip(flip), clean.flip(flip)
        if self.channel_shuffle:  # drawn after the crop and flip, so those stay as without it
            order = [0, 1, 2]
            rng.shuffle(order)
            rain, clean, small_rain, small_clean = (t[order] for t in (rain, clean, small_rain, small_clean))
        return TrainItem(rain=rain.contiguous(), clean=clean.contiguous(), query=small_rain, query_clean=small_clean)


class EpochSampler(Sampler):
    """Shuffles once per epoch from (seed, epoch), pads to whole batches, can start mid-epoch.

    Yields ``SampleKey``s carrying the epoch and ``seed`` (which fix the epoch's mix of real
    pairs) and an augmentation seed fixed by the position in the epoch, so a run resumed at
    batch k sees exactly the data an uninterrupted run would. One sampler serves a whole run:
    ``set_epoch(epoch, start_batch)`` before iterating each epoch (as ``DistributedSampler``).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration serve ``epoch`` from its batch ``start_batch`` on."""
        self.epoch, self.start_batch = epoch, start_batch

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
            yield SampleKey(order[pos], (self.seed * 7_919 + self.epoch) * 10_000_019 + pos, self.epoch, self.seed)

    def __len__(self) -> int:
        steps = self.batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start_batch
        return max(0, steps) * self.batch_size


def parse_data_paths(value: str) -> list[str]:
    """Split ``--data_paths a,b,c`` (spaces and empty entries ignored)."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise DataError("--data_paths is empty; pass folders with rain/ and norain/, separated by commas")
    return paths


if __name__ == "__main__":
    from utils.data.cli import main  # this file is not imported a second time: the CLI never imports it

    raise SystemExit(main())
