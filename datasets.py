"""Rain/clean pairs on disk, the public datasets' layouts, and the mixed training set.

Every public rain dataset is described once, in ``DATASET_SPECS`` (name -> folder under the
data root, splits, how its files pair, official counts). A folder's layout is recognised from
its *contents*, never from its path:

| layout        | what the folder holds                                   | pairing                             |
|---------------|---------------------------------------------------------|-------------------------------------|
| rain/norain   | ``rain/`` (or ``rain/X2/``) and ``norain/``             | naming rules below                  |
| SPA training  | ``real_world/`` and ``real_world_gt/``                  | ``real_world/S/S-k/S-k_X_Y.png`` -> ``real_world_gt/S/S_X_Y.png`` (or flat ``real_world_gt/S_X_Y.png``) |
| SPA test      | ``rain/`` and ``gt/``                                   | ``rain/N.png`` -> ``gt/Ngt.png``    |
| stacked       | side-by-side pair images (raw DID / Rain800)            | only when the dataset is named (evaluation, ``check``); training reads them after ``prepare`` |

Naming rules of ``rain/`` + ``norain/`` folders, tried in this order for each rainy file (the
first rule whose clean partner exists wins):

| rule     | rainy name         | clean name         | dataset                         |
|----------|--------------------|--------------------|---------------------------------|
| x2       | ``norain-7x2.png`` | ``norain-7.png``   | Rain200L, Rain200H              |
| prefix   | ``rain-007.png``   | ``norain-007.png`` | Rain800 (after ``prepare``)     |
| variant  | ``12_3.jpg``       | ``12.jpg``         | DDN-Data (14 rains per scene)   |
| same     | ``X.png``          | ``X.png``          | generic fallback: DID (after ``prepare``), demo data |

Items of the training set are (rain crop, clean crop, rain resized to crop, clean resized to
crop), float tensors (3,crop,crop) in [0,1].

Command line::

    python datasets.py prepare rain800|did RAW OUT   # split stacked pairs (and merge DID's densities)
    python datasets.py check ROOT                     # pairs vs official counts, unpaired, unreadable
    python datasets.py pairs FOLDER...                # count the pairs of folders
    python datasets.py demo [ROOT]                    # write the synthetic demo data
"""
from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from utils.errors import UserError
from utils.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(UserError, ValueError):
    """A dataset folder or file that cannot be used, with what to do about it."""


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, not an image); ``.path`` names it."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def is_image(name: str) -> bool:
    """True for a visible file name with an image extension."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
    """Image file names directly in ``folder``, sorted."""
    return sorted(f for f in os.listdir(folder) if is_image(f))


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _number_key(name: str) -> tuple:
    """Sort key putting ``2.jpg`` before ``10.jpg`` (numeric stems first, then by name)."""
    stem = _stem(name)
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


# --------------------------------------------------------------------------- dataset specs
@dataclass(frozen=True)
class PairRule:
    """How the clean stem follows from a rainy stem in a ``rain/`` + ``norain/`` folder."""
    name: str
    rain_stem: re.Pattern
    clean_stem: str  # ``re.sub`` replacement applied to the rainy stem


RULE_X2 = PairRule("x2", re.compile(r"^(norain-\d+)x2$"), r"\1")
RULE_PREFIX = PairRule("prefix", re.compile(r"^rain-(.+)$"), r"norain-\1")
RULE_VARIANT = PairRule("variant", re.compile(r"^(.+)_\d+$"), r"\1")
RULE_SAME = PairRule("same", re.compile(r"^(.*)$"), r"\1")


@dataclass(frozen=True)
class DatasetSpec:
    """One public dataset: where it lives under the data root and how its files pair.

    ``splits`` maps a split to its sub-folder of the dataset folder ("" = the folder itself).
    ``official`` holds the published number of pairs (images for RealInt) per split, used
    only by ``check``; ``None`` = not checked. ``stacked_rain_half`` says which half of a
    raw side-by-side image is the rainy one. ``markers``: a split whose folder is shared
    (SPA's training tree sits in the dataset folder itself) is present when this sub-folder is.
    """
    name: str
    folders: tuple[str, ...]
    aliases: tuple[str, ...]
    splits: dict
    official: dict
    rule: Optional[PairRule] = None
    stacked_rain_half: Optional[str] = None
    real: bool = False
    ground_truth: bool = True
    markers: dict = field(default_factory=dict)  # split -> sub-folder whose presence marks the split
    source: str = ""


# Conventions checked against each dataset's page and its authors' code (see README, "Datasets").
DATASET_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec("Rain200L", ("Rain200L",), ("rain200l", "rainlight"),
                {"train": "train", "test": "test"}, {"train": 1800, "test": 200}, rule=RULE_X2,
                source="Yang et al. (JORDER), icst.pku.edu.cn/struct/Projects/joint_rain_removal.html"),
    DatasetSpec("Rain200H", ("Rain200H",), ("rain200h", "rainheavy"),
                {"train": "train", "test": "test"}, {"train": 1800, "test": 200}, rule=RULE_X2,
                source="Yang et al. (JORDER), icst.pku.edu.cn/struct/Projects/joint_rain_removal.html"),
    # ID-CGAN is pix2pix trained BtoA on A|B images: input B (right) is rainy, target A (left) clean.
    DatasetSpec("Rain800", ("Rain800",), ("rain800", "test100"),
                {"train": "train", "test": "test"}, {"train": 700, "test": 100}, rule=RULE_PREFIX,
                stacked_rain_half="right", source="Zhang et al. (ID-CGAN), github.com/hezhangsprinter/ID-CGAN"),
    # DID-MDN's loader crops imgA = left half and trains with input = imgA: the left half is rainy.
    DatasetSpec("DID", ("DID", "DID-Data"), ("did", "did-data", "rain1200", "test1200"),
                {"train": "train", "test": "test"}, {"train": 12000, "test": 1200}, rule=RULE_SAME,
                stacked_rain_half="left", source="Zhang & Patel (DID-MDN), github.com/hezhangsprinter/DID-MDN"),
    DatasetSpec("DDN", ("DDN", "DDN-Data"), ("ddn", "ddn-data", "rain1400", "rain12600"),
                {"train": "train", "test": "test"}, {"train": 12600, "test": 1400}, rule=RULE_VARIANT,
                source="Fu et al. (DDN), xueyangfu.github.io/projects/cvpr2017.html"),
    DatasetSpec("SPA", ("spa", "SPA", "SPA-Data", "SPAData"), ("spa", "spa-data", "spadata"),
                {"train": "", "test": "real_test_1000"}, {"train": None, "test": 1000}, real=True,
                markers={"train": "real_world"}, source="Wang et al. (SPANet), github.com/stevewongv/SPANet"),
    DatasetSpec("RealInt", ("RealInt", "Real_Internet"), ("realint", "real_internet", "realinternet"),
                {"test": ""}, {"test": None}, real=True, ground_truth=False,
                source="Wang et al. (SPANet), Real_Internet.zip"),
)

# rain/ + norain/ naming rules in the order they are tried: the specs' own conventions, then
# the generic fallback (identical names).
PAIRING_RULES: tuple[PairRule, ...] = tuple(dict.fromkeys(
    s.rule for s in DATASET_SPECS if s.rule is not None and s.rule is not RULE_SAME)) + (RULE_SAME,)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name or alias (case-insensitive); unknown names list the valid ones."""
    key = name.strip().lower()
    for spec in DATASET_SPECS:
        if key == spec.name.lower() or key in spec.aliases or key in (f.lower() for f in spec.folders):
            return spec
    raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(s.name for s in DATASET_SPECS)}")


def find_dataset_folder(root: str, spec: DatasetSpec) -> Optional[str]:
    """``root/<folder>`` of a dataset (any of its folder names, case-insensitive), or None."""
    if not os.path.isdir(root):
        return None
    for name in spec.folders:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    wanted = {f.lower() for f in spec.folders}
    for name in sorted(os.listdir(root)):
        if name.lower() in wanted and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


# --------------------------------------------------------------------------- stacked images
class StackedHalf(str):
    """Path of a side-by-side stacked pair image, plus which half (``"left"``/``"right"``) to read.

    A ``str`` so that pair lists keep holding paths (``os.path.basename`` etc. work);
    ``read_image`` returns only the named half.
    """
    half: str

    def __new__(cls, path: str, half: str):
        if half not in ("left", "right"):
            raise ValueError(f"half must be 'left' or 'right', got {half!r}")
        obj = super().__new__(cls, path)
        obj.half = half
        return obj

    def __reduce__(self):  # DataLoader workers pickle the pair list
        return StackedHalf, (str(self), self.half)

    def __repr__(self) -> str:
        return f"StackedHalf({str(self)!r}, {self.half!r})"


def split_stacked(img: Tensor, path: str = "image") -> tuple[Tensor, Tensor]:
    """(3,H,2W) side-by-side pair -> (left (3,H,W), right (3,H,W))."""
    w = img.shape[-1]
    if w % 2:
        raise DataError(f"{path} is not a side-by-side pair: its width {w} is odd")
    return img[..., : w // 2], img[..., w // 2:]


def stacked_pairs(folder: str, rain_half: str) -> list[tuple[str, str]]:
    """(rain, clean) references to the two halves of each stacked image in ``folder``."""
    clean_half = "right" if rain_half == "left" else "left"
    return [(StackedHalf(os.path.join(folder, f), rain_half), StackedHalf(os.path.join(folder, f), clean_half))
            for f in sorted(list_images(folder), key=_number_key)]


# --------------------------------------------------------------------------- pairing
@dataclass
class FolderScan:
    """What a data folder holds: its layout, its pairs and the files that pair with nothing."""
    folder: str
    layout: str
    pairs: list = field(default_factory=list)
    unpaired_rain: list = field(default_factory=list)
    unpaired_clean: list = field(default_factory=list)
    rules: dict = field(default_factory=dict)  # rule name -> pairs it made
    real: bool = False


def _pair_rain_norain(folder: str, rain_dir: str, clean_dir: str) -> FolderScan:
    scan = FolderScan(folder, "rain/norain")
    clean_by_stem = {_stem(f): f for f in list_images(clean_dir)}
    used = set()
    for name in list_images(rain_dir):
        stem = _stem(name)
        for rule in PAIRING_RULES:
            if rule.rain_stem.match(stem):
                partner = clean_by_stem.get(rule.rain_stem.sub(rule.clean_stem, stem))
                if partner is not None:
                    scan.pairs.append((os.path.join(rain_dir, name), os.path.join(clean_dir, partner)))
                    scan.rules[rule.name] = scan.rules.get(rule.name, 0) + 1
                    used.add(partner)
                    break
        else:
            scan.unpaired_rain.append(os.path.join(rain_dir, name))
    scan.unpaired_clean = [os.path.join(clean_dir, f) for f in sorted(set(clean_by_stem.values()) - used)]
    return scan


def _pair_spa_test(folder: str) -> FolderScan:
    # real_test_1000: rain/000.png <-> gt/000gt.png
    rain_dir, gt_dir = os.path.join(folder, "rain"), os.path.join(folder, "gt")
    scan = FolderScan(folder, "SPA test", real=True)
    gt_by_stem = {_stem(f): f for f in list_images(gt_dir)}
    used = set()
    for name in list_images(rain_dir):
        partner = gt_by_stem.get(_stem(name) + "gt") or gt_by_stem.get(_stem(name))
        if partner is None:
            scan.unpaired_rain.append(os.path.join(rain_dir, name))
        else:
            scan.pairs.append((os.path.join(rain_dir, name), os.path.join(gt_dir, partner)))
            used.add(partner)
    scan.unpaired_clean = [os.path.join(gt_dir, f) for f in sorted(set(gt_by_stem.values()) - used)]
    scan.rules["spa-test"] = len(scan.pairs)
    return scan


def _pair_spa_train(folder: str) -> FolderScan:
    """real_world/{S}/{S}-{k}/{S}-{k}_{x}_{y}.png <-> real_world_gt/{S}/{S}_{x}_{y}.png.

    SPANet's dataset README and the published CoIC loader both nest the ground truth per
    scene; a flat ``real_world_gt/{S}_{x}_{y}.png`` is accepted too.
    """
    rain_root, gt_root = os.path.join(folder, "real_world"), os.path.join(folder, "real_world_gt")
    scan = FolderScan(folder, "SPA training", real=True)
    flat_gt = {_stem(f): f for f in list_images(gt_root)}
    used: set[str] = set()
    for scene in sorted(d for d in os.listdir(rain_root) if os.path.isdir(os.path.join(rain_root, d))):
        scene_gt_dir = os.path.join(gt_root, scene)
        scene_gt = {_stem(f): f for f in list_images(scene_gt_dir)} if os.path.isdir(scene_gt_dir) else {}
        scene_dir = os.path.join(rain_root, scene)
        for clip in sorted(os.listdir(scene_dir)):
            clip_dir = os.path.join(scene_dir, clip)
            if not os.path.isdir(clip_dir):
                continue
            for name in list_images(clip_dir):
                parts = _stem(name).rsplit("_", 2)  # "{S}-{k}", x, y
                gt_stem = f"{scene}_{parts[1]}_{parts[2]}" if len(parts) == 3 else None
                if gt_stem in scene_gt:
                    partner = os.path.join(scene_gt_dir, scene_gt[gt_stem])
                elif gt_stem in flat_gt:
                    partner = os.path.join(gt_root, flat_gt[gt_stem])
                else:
                    scan.unpaired_rain.append(os.path.join(clip_dir, name))
                    continue
                scan.pairs.append((os.path.join(clip_dir, name), partner))
                used.add(partner)
    all_gt = [os.path.join(gt_root, f) for f in flat_gt.values()]
    for scene in sorted(os.listdir(gt_root)):
        if os.path.isdir(os.path.join(gt_root, scene)):
            all_gt += [os.path.join(gt_root, scene, f) for f in list_images(os.path.join(gt_root, scene))]
    scan.unpaired_clean = sorted(set(all_gt) - used)
    scan.rules["spa-train"] = len(scan.pairs)
    return scan


def scan_folder(folder: str, stacked_rain_half: Optional[str] = None) -> FolderScan:
    """Recognise ``folder``'s layout from its contents and pair its files.

    ``stacked_rain_half`` (``"left"``/``"right"``): read a folder of side-by-side images as
    stacked pairs with that half rainy; without it such a folder is an error, because DID
    (left rainy) and Rain800 (right rainy) name their files alike.
    """
    if not os.path.isdir(folder):
        raise DataError(f"data path {folder} does not exist; pass folders that contain rain/ and norain/")
    has = {d: os.path.isdir(os.path.join(folder, d)) for d in ("rain", "norain", "gt", "real_world", "real_world_gt")}
    if has["real_world"] and has["real_world_gt"]:
        return _pair_spa_train(folder)
    if has["rain"] and has["norain"]:
        rain_dir = os.path.join(folder, "rain")
        if not list_images(rain_dir) and os.path.isdir(os.path.join(rain_dir, "X2")):
            rain_dir = os.path.join(rain_dir, "X2")  # Rain200L/H as downloaded: rain/X2/norain-{i}x2.png
        return _pair_rain_norain(folder, rain_dir, os.path.join(folder, "norain"))
    if has["rain"] and has["gt"]:
        return _pair_spa_test(folder)
    if has["rain"] or has["norain"]:
        missing = "norain" if has["rain"] else "rain"
        raise DataError(f"data path {folder} has no {missing}/ folder; each data path must contain rain/ and norain/")
    if stacked_rain_half is not None and list_images(folder):
        scan = FolderScan(folder, f"stacked ({stacked_rain_half} half rainy)",
                          pairs=stacked_pairs(folder, stacked_rain_half))
        scan.rules["stacked"] = len(scan.pairs)
        return scan
    if list_images(folder):
        raise DataError(f"data path {folder} holds images but no rain/ and norain/ folders: split raw Rain800 or "
                        "DID side-by-side images first (python datasets.py prepare rain800|did RAW OUT)")
    raise DataError(f"data path {folder} has no rain/ folder; each data path must contain rain/ and norain/ "
                    "(or real_world/ + real_world_gt/ for SPA-Data)")


def find_pairs(folder: str, stacked_rain_half: Optional[str] = None) -> list[tuple[str, str]]:
    """(rain path, clean path) pairs of a data folder (any layout of ``scan_folder``), sorted.

    Raises ``DataError`` for a rainy image without its clean partner or a folder without pairs.
    """
    return _require_pairs(scan_folder(folder, stacked_rain_half))


def _require_pairs(scan: FolderScan) -> list[tuple[str, str]]:
    """The pairs of a scan; ``DataError`` for an unpaired rainy image or no pairs at all."""
    folder = scan.folder
    if scan.unpaired_rain:
        first = scan.unpaired_rain[0]
        more = f" (and {len(scan.unpaired_rain) - 1} more)" if len(scan.unpaired_rain) > 1 else ""
        raise DataError(f"rainy image {first} has no clean partner in {_clean_dir_of(scan)}{more}")
    if not scan.pairs:
        raise DataError(f"data path {folder} yields no rain/clean pairs (is rain/ empty?)")
    return scan.pairs


def _clean_dir_of(scan: FolderScan) -> str:
    sub = {"rain/norain": "norain", "SPA test": "gt", "SPA training": "real_world_gt"}.get(scan.layout, "")
    return os.path.join(scan.folder, sub)


# --------------------------------------------------------------------------- reading and writing
def _decode_native(path: str) -> tuple[np.ndarray, str]:
    """Decode an image file as PIL holds it: ((H,W) or (H,W,C) array in the file's own dtype, uint8
    for 8-bit images; PIL mode). What ``MixedRainDataset.cache_images`` keeps."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palette / other colour spaces
                img = img.convert("RGB")
            return np.asarray(img), img.mode
    except Exception as exc:  # missing, truncated, corrupt, not an image
        raise UnreadableImageError(f"cannot read image {path} ({type(exc).__name__}: {exc})", str(path)) from None


def _to_float_rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    """A ``_decode_native`` result as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted)."""
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
    return arr


def _decode(path: str) -> np.ndarray:
    """Any image file as float32 (H,W,3) in [0,1] (grey, RGBA and 16-bit converted)."""
    return _to_float_rgb(*_decode_native(path))


def _chw(arr: np.ndarray) -> Tensor:
    """float32 (H,W,3) -> (3,H,W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def read_image(path: Union[str, StackedHalf], decode: Optional[Callable[[str], np.ndarray]] = None) -> Tensor:
    """Read an image file as RGB float (3,H,W) in [0,1] (grey, RGBA and 16-bit converted).

    A ``StackedHalf`` path returns only its half of the side-by-side image. ``decode`` maps a
    file path to float32 (H,W,3) in [0,1] (the training set passes its image cache).
    """
    img = _chw((decode or _decode)(str(path)))
    if isinstance(path, StackedHalf):
        left, right = split_stacked(img, str(path))
        img = (left if path.half == "left" else right).contiguous()
    return img


def read_pair(rain_path: str, clean_path: str,
              decode: Optional[Callable[[str], np.ndarray]] = None) -> tuple[Tensor, Tensor]:
    """(rain (3,H,W), clean (3,H,W)) in [0,1]; a stacked image is decoded once for both halves.

    Raises ``UnreadableImageError`` for a file that cannot be decoded and ``DataError`` when
    the two sizes differ. ``decode`` as in ``read_image``.
    """
    if isinstance(rain_path, StackedHalf) and isinstance(clean_path, StackedHalf) and str(rain_path) == str(clean_path):
        left, right = split_stacked(_chw((decode or _decode)(str(rain_path))), str(rain_path))
        halves = {"left": left.contiguous(), "right": right.contiguous()}
        rain, clean = halves[rain_path.half], halves[clean_path.half]
    else:
        rain, clean = read_image(rain_path, decode), read_image(clean_path, decode)
    if rain.shape != clean.shape:
        raise DataError(f"pair sizes differ: {rain_path} is {tuple(rain.shape[1:])}, "
                        f"{clean_path} is {tuple(clean.shape[1:])}")
    return rain, clean


def _write_atomic_image(arr: np.ndarray, path: str) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp))  # the temporary name keeps the extension


def save_image(img: Tensor, path: str) -> None:
    """Write (3,H,W) in [0,1] as an 8-bit PNG/JPEG (rounded), atomically."""
    arr = (img.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    _write_atomic_image(arr, path)


def resize(img: Tensor, size: int) -> Tensor:
    """(3,H,W) -> (3,size,size), bilinear with antialiasing (torchvision's Resize on tensors)."""
    return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


# --------------------------------------------------------------------------- training set
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


def available_memory() -> Optional[int]:
    """Bytes of memory this machine can still give (``MemAvailable``, or less under a cgroup limit); None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:  # free pages only: stricter than MemAvailable, which counts reclaimable caches too
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:  # a container's limit (cgroup v2) can be far below what the host reports
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read())
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def _decoded_size(path: str) -> int:
    """Bytes ``_decode_native`` will hold for ``path``, from the file's header only."""
    with Image.open(path) as img:
        (w, h), bands, mode = img.size, len(img.getbands()), img.mode
    per_value = 2 if "16" in mode else 4 if mode in ("I", "F", "I;32") else 1
    return w * h * bands * per_value


def estimate_decoded_bytes(paths: Sequence[str], sample: int = _CACHE_SIZE_SAMPLE) -> int:
    """Estimated bytes of all ``paths`` decoded (headers of at most ``sample`` evenly spaced files)."""
    picked = list(paths)[::max(1, math.ceil(len(paths) / sample))]
    sizes = []
    for path in picked:
        try:
            sizes.append(_decoded_size(path))
        except Exception:  # unreadable: the decoding pass names it
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
    """

    def __init__(self, data_paths: Sequence[str], crop_size: int, strict: bool = False):
        self.crop_size = crop_size
        self.strict = strict
        self.synthetic_pairs: list[tuple[str, str]] = []
        self.synthetic_sources: list[str] = []
        self.real_pairs: list[tuple[str, str]] = []
        self.real_sources: list[str] = []
        for path in data_paths:
            scan = scan_folder(path)
            found = _require_pairs(scan)
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
        self._images: Optional[dict[str, tuple[np.ndarray, str]]] = None  # path -> (_decode_native result)
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
        images: dict[str, tuple[np.ndarray, str]] = {}
        unreadable: dict[str, str] = {}
        for path in tqdm(paths, desc="caching images", unit="img", disable=not progress, dynamic_ncols=True):
            try:
                arr, mode = _decode_native(path)
            except UnreadableImageError as exc:
                if self.strict:
                    raise DataError(f"{exc} (training with strict data checking)") from None
                logger.warning("cannot cache unreadable training image %s; its pairs will be skipped", exc.path)
                unreadable[path] = str(exc)
                continue
            # An array owning its own buffer: forked workers then share the pixel pages untouched.
            images[path] = (np.array(arr, copy=True), mode)
        self._images, self._unreadable = images, unreadable
        logger.info("cached %d training images (%.2f GiB)", len(images),
                    sum(a.nbytes for a, _ in images.values()) / 2 ** 30)

    def _decode_cached(self, path: str) -> np.ndarray:
        """float32 (H,W,3) in [0,1] of ``path``, from the image cache when there is one."""
        if self._images is not None:
            if path in self._images:
                return _to_float_rgb(*self._images[path])
            if path in self._unreadable:
                raise UnreadableImageError(self._unreadable[path], path)
        return _decode(path)

    # -------------------------------------------------------------- items
    def __getitem__(self, key) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
                logger.warning("skipping unreadable training image %s; using the next pair instead", exc.path)
                continue
            return self._augment(rain, clean, rng)
        raise DataError(f"{min(n, MAX_CONSECUTIVE_SKIPS)} unreadable training pairs in a row from "
                        f"{self._pair_at(index % n, epoch, mix_seed)[0]}; check the data with: "
                        "python datasets.py check ROOT")

    def _augment(self, rain: Tensor, clean: Tensor, rng) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = self.crop_size
        small_rain, small_clean = resize(rain, p), resize(clean, p)
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
        return rain.contiguous(), clean.contiguous(), small_rain, small_clean


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


# --------------------------------------------------------------------------- prepare
_DID_DENSITIES = ("rain_heavy", "rain_medium", "rain_light")  # the merge order


def _images_below(folder: str) -> list[str]:
    """Images directly in ``folder``, else in its only sub-folder that has images (DID's train2018new/)."""
    direct = list_images(folder)
    if direct:
        return [os.path.join(folder, f) for f in sorted(direct, key=_number_key)]
    subs = [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    with_images = [d for d in subs if list_images(d)]
    if len(with_images) == 1:
        return [os.path.join(with_images[0], f) for f in sorted(list_images(with_images[0]), key=_number_key)]
    return []


def _did_density_folders(raw: str) -> list[str]:
    """DID's Rain_Heavy/Rain_Medium/Rain_Light training folders found in ``raw`` or one level below."""
    found: dict[str, str] = {}
    for base in [raw] + [os.path.join(raw, d) for d in sorted(os.listdir(raw)) if os.path.isdir(os.path.join(raw, d))]:
        for d in sorted(os.listdir(base)):
            if d.lower() in _DID_DENSITIES and os.path.isdir(os.path.join(base, d)):
                found.setdefault(d.lower(), os.path.join(base, d))
    return [found[k] for k in _DID_DENSITIES if k in found]


def _plan_prepare(kind: str, raw: str) -> list[tuple[str, str, str]]:
    """(source stacked image, rainy output name, clean output name) for ``prepare``."""
    if not os.path.isdir(raw):
        raise DataError(f"prepare: RAW folder {raw} does not exist")
    sources: list[str] = []
    if kind == "did":
        densities = _did_density_folders(raw)
        if densities:
            if len(densities) < 3:
                logger.warning("prepare did: only %s found in %s (DID has Rain_Heavy, Rain_Medium, Rain_Light)",
                               ", ".join(os.path.basename(d) for d in densities), raw)
            for d in densities:
                found = _images_below(d)
                if not found:
                    raise DataError(f"prepare did: {d} holds no images")
                sources.extend(found)
            # Merged training set: renumbered 1..N, heavy then medium then light.
            return [(src, f"{k}.png", f"{k}.png") for k, src in enumerate(sources, 1)]
    sources = [os.path.join(raw, f) for f in sorted(list_images(raw), key=_number_key)]
    if not sources:
        hint = " (nor Rain_Heavy/Rain_Medium/Rain_Light folders)" if kind == "did" else ""
        raise DataError(f"prepare {kind}: {raw} holds no images{hint}")
    stems = [_stem(os.path.basename(s)) for s in sources]
    numbers = [int(s) for s in stems] if all(s.isdigit() for s in stems) else list(range(1, len(stems) + 1))
    if kind == "rain800":
        return [(src, f"rain-{n:03d}.png", f"norain-{n:03d}.png") for src, n in zip(sources, numbers)]
    return [(src, f"{n}.png", f"{n}.png") for src, n in zip(sources, numbers)]


def _rgb8(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise UnreadableImageError(f"cannot read image {path} ({type(exc).__name__}: {exc})", path) from None


def prepare(kind: str, raw: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Split raw side-by-side images of ``kind`` ("rain800" or "did") into ``out/rain`` + ``out/norain``.

    Rain800 (ID-CGAN): left half clean, right half rainy; written as ``rain-NNN.png`` /
    ``norain-NNN.png``. DID (DID-MDN): left half rainy, right half clean; ``RAW`` holding
    Rain_Heavy/Rain_Medium/Rain_Light is merged and renumbered ``1..N.png`` (heavy, medium,
    light), a flat folder keeps its numbers. Halves are written losslessly as PNG and
    ``out/sources.csv`` maps each output to its source. Idempotent: an existing identical
    output is left alone; a different one stops with an error unless ``overwrite``.
    Returns counts ``{"written", "unchanged", "overwritten"}``.
    """
    from tqdm import tqdm

    kind = kind.lower()
    spec = {"rain800": dataset_spec("Rain800"), "did": dataset_spec("DID")}.get(kind)
    if spec is None:
        raise DataError(f"prepare: unknown dataset {kind!r}; choose rain800 or did")
    plan = _plan_prepare(kind, raw)
    counts = {"written": 0, "unchanged": 0, "overwritten": 0}
    rain_dir, clean_dir = os.path.join(out, "rain"), os.path.join(out, "norain")
    for src, rain_name, clean_name in tqdm(plan, desc=f"prepare {kind}", unit="img", disable=not progress,
                                           dynamic_ncols=True):
        arr = _rgb8(src)
        if arr.shape[1] % 2:
            raise DataError(f"{src} is not a side-by-side pair: its width {arr.shape[1]} is odd")
        half = arr.shape[1] // 2
        left, right = arr[:, :half], arr[:, half:]
        rain, clean = (left, right) if spec.stacked_rain_half == "left" else (right, left)
        for img, path in ((rain, os.path.join(rain_dir, rain_name)), (clean, os.path.join(clean_dir, clean_name))):
            if os.path.exists(path):
                try:
                    same = np.array_equal(_rgb8(path), img)
                except UnreadableImageError:
                    same = False
                if same:
                    counts["unchanged"] += 1
                    continue
                if not overwrite:
                    raise DataError(f"{path} already exists and differs from the half of {src} that belongs there; "
                                    "remove it, choose another OUT, or pass --overwrite")
                counts["overwritten"] += 1
            else:
                counts["written"] += 1
            _write_atomic_image(np.ascontiguousarray(img), path)
    _write_csv_atomic(os.path.join(out, "sources.csv"), ["rain", "norain", "source"],
                      [[r, c, os.path.abspath(s)] for s, r, c in plan])
    return counts


def _write_csv_atomic(path: str, header: list, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- check
@dataclass
class CheckResult:
    """``check`` of one dataset split: counts and the files that are wrong."""
    dataset: str
    split: str
    folder: str
    layout: str = ""
    pairs: int = 0
    expected: Optional[int] = None
    unpaired: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    missized: list = field(default_factory=list)
    error: str = ""
    absent: bool = False

    def problems(self, ignore_counts: bool = False) -> list[str]:
        """What is wrong (empty when all is well); an absent dataset or split is not a problem."""
        out = []
        if self.absent:
            return out
        if self.error:
            out.append(self.error)
        if self.unpaired:
            out.append(f"{len(self.unpaired)} unpaired")
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable")
        if self.missized:
            out.append(f"{len(self.missized)} mis-sized")
        if not ignore_counts and not self.error and self.expected is not None and self.pairs != self.expected:
            out.append(f"{self.pairs} of {self.expected} expected")
        return out


def _image_size(path: str, cache: dict, full: bool) -> tuple:
    """(H, W) of an image, or raises UnreadableImageError; decoded fully unless ``full`` is False."""
    if path not in cache:
        try:
            with Image.open(path) as img:
                if full:
                    img.load()
                cache[path] = (img.height, img.width)
        except Exception as exc:
            cache[path] = UnreadableImageError(f"{path} ({type(exc).__name__}: {exc})", path)
    if isinstance(cache[path], Exception):
        raise cache[path]
    return cache[path]


def _realint_images(folder: str) -> list[str]:
    for sub in ("", "rain", "Real_Internet"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d) and list_images(d):
            return [os.path.join(d, f) for f in list_images(d)]
    return []


def check_split(spec: DatasetSpec, split: str, folder: str, full: bool = True, progress: bool = True) -> CheckResult:
    """Pair a dataset split as training/evaluation would and verify every image of it."""
    from tqdm import tqdm

    result = CheckResult(spec.name, split, folder, expected=spec.official.get(split))
    marker = spec.markers.get(split)
    if not os.path.isdir(os.path.join(folder, marker) if marker else folder):
        result.absent = True
        return result
    if not spec.ground_truth:
        images = _realint_images(folder)
        result.layout, result.pairs = "images (no ground truth)", len(images)
        if not images:
            result.error = f"no images in {folder}"
        cache: dict = {}
        for path in tqdm(images, desc=f"check {spec.name}", unit="img", disable=not progress, dynamic_ncols=True):
            try:
                _image_size(path, cache, full)
            except UnreadableImageError as exc:
                result.unreadable.append(str(exc))
        return result
    try:
        scan = scan_folder(folder, spec.stacked_rain_half)
    except DataError as exc:
        result.error = str(exc)
        return result
    result.layout, result.pairs = scan.layout, len(scan.pairs)
    result.unpaired = scan.unpaired_rain + scan.unpaired_clean
    if not scan.pairs:
        result.error = f"no rain/clean pairs in {folder}"
    elif scan.layout.startswith("stacked") and split == "train":
        # evaluation reads stacked test sets; training needs rain/ + norain/
        result.error = (f"side-by-side images: run python datasets.py prepare {spec.name.lower()} {folder} OUT "
                        "before training on them")
    cache = {}
    bad: set = set()
    for rain, clean in tqdm(scan.pairs, desc=f"check {spec.name}/{split}", unit="pair", disable=not progress,
                            dynamic_ncols=True):
        sizes = []
        for path in (rain, clean):
            try:
                sizes.append(_image_size(str(path), cache, full))
            except UnreadableImageError as exc:
                if str(path) not in bad:
                    bad.add(str(path))
                    result.unreadable.append(str(exc))
        if len(sizes) < 2:
            continue
        if isinstance(rain, StackedHalf):
            if sizes[0][1] % 2:
                result.missized.append(f"{rain}: width {sizes[0][1]} is odd, not a side-by-side pair")
        elif sizes[0] != sizes[1]:
            result.missized.append(f"{rain} is {sizes[0][0]}x{sizes[0][1]} but {clean} is {sizes[1][0]}x{sizes[1][1]}")
    return result


def check_root(root: str, full: bool = True, progress: bool = True) -> list[CheckResult]:
    """``check_split`` for every dataset of ``DATASET_SPECS`` found under ``root`` (absent ones flagged)."""
    results = []
    for spec in DATASET_SPECS:
        folder = find_dataset_folder(root, spec)
        if folder is None:
            results.append(CheckResult(spec.name, "-", os.path.join(root, spec.folders[0]), absent=True))
            continue
        for split, sub in spec.splits.items():
            results.append(check_split(spec, split, os.path.join(folder, sub) if sub else folder, full, progress))
    return results


def format_check(results: list[CheckResult], ignore_counts: bool = False, max_files: int = 10) -> str:
    """The report ``check`` prints: one line per dataset split, then the files that are wrong."""
    lines = [f"{'dataset':<10} {'split':<6} {'pairs':>8} {'official':>9}  {'layout':<28} status"]
    details = []
    for r in results:
        if r.absent:
            lines.append(f"{r.dataset:<10} {r.split:<6} {'':>8} {'':>9}  {'':<28} absent ({r.folder})")
            continue
        problems = r.problems(ignore_counts)
        status = "ok" if not problems else "PROBLEM: " + "; ".join(problems)
        expected = "" if r.expected is None else str(r.expected)
        lines.append(f"{r.dataset:<10} {r.split:<6} {r.pairs:>8} {expected:>9}  {r.layout[:28]:<28} {status}")
        for title, files in (("unpaired", r.unpaired), ("unreadable", r.unreadable), ("mis-sized", r.missized)):
            if files:
                details.append(f"{r.dataset}/{r.split} {title}:")
                details += [f"  {f}" for f in files[:max_files]]
                if len(files) > max_files:
                    details.append(f"  ... and {len(files) - max_files} more")
    return "\n".join(lines + ([""] + details if details else []))


if __name__ == "__main__":
    from utils.dataset_cli import main

    raise SystemExit(main())
