"""Data-folder layouts as data: one ``Layout`` per way a folder holds its rain/clean pairs.

A folder's layout is recognised from its *contents*, never from its path. Training
(``datasets.MixedRainDataset``), ``check`` and evaluation (``utils.eval.evaluation``) all ask
``detect_layout``/``scan_folder``, so a new layout is one more entry of ``LAYOUTS``.

| layout        | what the folder holds                        | pairing                                     |
|---------------|----------------------------------------------|---------------------------------------------|
| SPA training  | ``real_world/`` and ``real_world_gt/``       | ``real_world/S/S-k/S-k_X_Y.png`` -> ``real_world_gt/S/S_X_Y.png`` (or flat ``real_world_gt/S_X_Y.png``) |
| rain/norain   | ``rain/`` (or ``rain/X2/``) and ``norain/``  | the naming rules below                      |
| SPA test      | ``rain/`` and ``gt/``                        | ``rain/N.png`` -> ``gt/Ngt.png``            |
| stacked       | side-by-side pair images (raw DID / Rain800) | only when the rainy half is named (evaluation, ``check``); training reads them after ``prepare`` |

Naming rules of ``rain/`` + ``norain/`` folders, tried in this order for each rainy file (the
first rule whose clean partner exists wins):

| rule     | rainy name         | clean name         | dataset                         |
|----------|--------------------|--------------------|---------------------------------|
| x2       | ``norain-7x2.png`` | ``norain-7.png``   | Rain200L, Rain200H              |
| prefix   | ``rain-007.png``   | ``norain-007.png`` | Rain800 (after ``prepare``)     |
| variant  | ``12_3.jpg``       | ``12.jpg``         | DDN-Data (14 rains per scene)   |
| same     | ``X.png``          | ``X.png``          | generic fallback: DID (after ``prepare``), demo data |
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from utils.errors import DataError
from utils.images import StackedHalf, list_images, number_key

__all__ = ["PairRule", "RULE_X2", "RULE_PREFIX", "RULE_VARIANT", "RULE_SAME", "PAIRING_RULES", "FolderScan",
           "Layout", "LAYOUTS", "STACKED", "IMAGE_FOLDERS", "detect_layout", "claims_pairs", "scan_folder",
           "find_pairs", "require_pairs", "stacked_pairs", "find_images"]


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _subdirs(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


# --------------------------------------------------------------------------- naming rules
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
# The datasets' own conventions first (utils.data.specs names each one's), then the fallback.
PAIRING_RULES: tuple[PairRule, ...] = (RULE_X2, RULE_PREFIX, RULE_VARIANT, RULE_SAME)


# --------------------------------------------------------------------------- scans
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
    clean_dir: str = ""  # where a rainy image's partner is looked for (named in errors)


def _match_by_stem(scan: FolderScan, rain_dir: str, clean_dir: str, partner_stems: Callable[[str], list]) -> None:
    """Pair each image of ``rain_dir`` with the first existing clean stem of ``partner_stems(stem)``."""
    clean_by_stem = {_stem(f): f for f in list_images(clean_dir)}
    used = set()
    for name in list_images(rain_dir):
        for rule, stem in partner_stems(_stem(name)):
            partner = clean_by_stem.get(stem)
            if partner is not None:
                scan.pairs.append((os.path.join(rain_dir, name), os.path.join(clean_dir, partner)))
                scan.rules[rule] = scan.rules.get(rule, 0) + 1
                used.add(partner)
                break
        else:
            scan.unpaired_rain.append(os.path.join(rain_dir, name))
    scan.unpaired_clean = [os.path.join(clean_dir, f) for f in sorted(set(clean_by_stem.values()) - used)]


def _pair_rain_norain(folder: str) -> FolderScan:
    rain_dir, clean_dir = os.path.join(folder, "rain"), os.path.join(folder, "norain")
    if not list_images(rain_dir) and os.path.isdir(os.path.join(rain_dir, "X2")):
        rain_dir = os.path.join(rain_dir, "X2")  # Rain200L/H as downloaded: rain/X2/norain-{i}x2.png
    scan = FolderScan(folder, "rain/norain", clean_dir=clean_dir)
    _match_by_stem(scan, rain_dir, clean_dir, lambda stem: [(r.name, r.rain_stem.sub(r.clean_stem, stem))
                                                            for r in PAIRING_RULES if r.rain_stem.match(stem)])
    return scan


def _pair_spa_test(folder: str) -> FolderScan:
    # real_test_1000: rain/000.png <-> gt/000gt.png (or gt/000.png)
    rain_dir, gt_dir = os.path.join(folder, "rain"), os.path.join(folder, "gt")
    scan = FolderScan(folder, "SPA test", real=True, clean_dir=gt_dir)
    _match_by_stem(scan, rain_dir, gt_dir, lambda stem: [("spa-test", stem + "gt"), ("spa-test", stem)])
    scan.rules["spa-test"] = len(scan.pairs)
    return scan


def _pair_spa_train(folder: str) -> FolderScan:
    """real_world/{S}/{S}-{k}/{S}-{k}_{x}_{y}.png <-> real_world_gt/{S}/{S}_{x}_{y}.png.

    SPANet's dataset README and the published CoIC loader both nest the ground truth per
    scene; a flat ``real_world_gt/{S}_{x}_{y}.png`` is accepted too.
    """
    rain_root, gt_root = os.path.join(folder, "real_world"), os.path.join(folder, "real_world_gt")
    scan = FolderScan(folder, "SPA training", real=True, clean_dir=gt_root)
    flat_gt = {_stem(f): f for f in list_images(gt_root)}
    used: set[str] = set()
    for scene in _subdirs(rain_root):
        scene_gt_dir = os.path.join(gt_root, scene)
        scene_gt = {_stem(f): f for f in list_images(scene_gt_dir)} if os.path.isdir(scene_gt_dir) else {}
        for clip in _subdirs(os.path.join(rain_root, scene)):
            clip_dir = os.path.join(rain_root, scene, clip)
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
    for scene in _subdirs(gt_root):
        all_gt += [os.path.join(gt_root, scene, f) for f in list_images(os.path.join(gt_root, scene))]
    scan.unpaired_clean = sorted(set(all_gt) - used)
    scan.rules["spa-train"] = len(scan.pairs)
    return scan


def stacked_pairs(folder: str, rain_half: str) -> list[tuple[str, str]]:
    """(rain, clean) references to the two halves of each stacked image in ``folder``."""
    clean_half = "right" if rain_half == "left" else "left"
    return [(StackedHalf(os.path.join(folder, f), rain_half), StackedHalf(os.path.join(folder, f), clean_half))
            for f in sorted(list_images(folder), key=number_key)]


def _pair_stacked(folder: str, rain_half: str) -> FolderScan:
    scan = FolderScan(folder, f"stacked ({rain_half} half rainy)", pairs=stacked_pairs(folder, rain_half),
                      clean_dir=folder)
    scan.rules["stacked"] = len(scan.pairs)
    return scan


# --------------------------------------------------------------------------- the layouts
@dataclass(frozen=True)
class Layout:
    """One folder layout: the sub-folders that identify it, how it pairs, where its clean images are.

    ``folders``: all must exist for the layout to be detected. ``markers``: any one of them says
    the folder is meant to be paired (so evaluation scores it, and a missing partner folder is
    an error instead of a folder of unscored images).
    """
    name: str
    folders: tuple[str, ...]
    markers: tuple[str, ...]
    clean: str
    pair: Callable[[str], FolderScan]
    real: bool = False

    def detect(self, folder: str) -> bool:
        return all(os.path.isdir(os.path.join(folder, d)) for d in self.folders)

    def claims(self, folder: str) -> bool:
        return any(os.path.isdir(os.path.join(folder, d)) for d in self.markers)

    def clean_dir(self, folder: str) -> str:
        return os.path.join(folder, self.clean)


# Detection order: SPA's training tree first (it may sit beside other folders), then rain/ + norain/.
LAYOUTS: tuple[Layout, ...] = (
    Layout("SPA training", ("real_world", "real_world_gt"), ("real_world", "real_world_gt"), "real_world_gt",
           _pair_spa_train, real=True),
    Layout("rain/norain", ("rain", "norain"), ("norain",), "norain", _pair_rain_norain),
    Layout("SPA test", ("rain", "gt"), ("gt",), "gt", _pair_spa_test, real=True),
)
STACKED = "stacked"  # not detected: side-by-side images need the dataset's rainy half (DatasetSpec)
IMAGE_FOLDERS = ("", "rain", "Real_Internet")  # where a folder of rainy images only keeps them (RealInt)


def detect_layout(folder: str) -> Optional[Layout]:
    """The first layout of ``LAYOUTS`` whose folders ``folder`` holds, or None."""
    return next((layout for layout in LAYOUTS if layout.detect(folder)), None)


def claims_pairs(folder: str) -> bool:
    """True when ``folder`` holds a marker of some layout: it is meant to be paired (and scored)."""
    return any(layout.claims(folder) for layout in LAYOUTS)


def scan_folder(folder: str, stacked_rain_half: Optional[str] = None) -> FolderScan:
    """Recognise ``folder``'s layout from its contents and pair its files.

    ``stacked_rain_half`` (``"left"``/``"right"``): read a folder of side-by-side images as
    stacked pairs with that half rainy; without it such a folder is an error, because DID
    (left rainy) and Rain800 (right rainy) name their files alike.
    """
    if not os.path.isdir(folder):
        raise DataError(f"data path {folder} does not exist; pass folders that contain rain/ and norain/")
    layout = detect_layout(folder)
    if layout is not None:
        return layout.pair(folder)
    has_rain, has_norain = (os.path.isdir(os.path.join(folder, d)) for d in ("rain", "norain"))
    if has_rain or has_norain:
        missing = "norain" if has_rain else "rain"
        raise DataError(f"data path {folder} has no {missing}/ folder; each data path must contain rain/ and norain/")
    if stacked_rain_half is not None and list_images(folder):
        return _pair_stacked(folder, stacked_rain_half)
    if list_images(folder):
        raise DataError(f"data path {folder} holds images but no rain/ and norain/ folders: split raw Rain800 or "
                        "DID side-by-side images first (python datasets.py prepare rain800|did RAW OUT)")
    raise DataError(f"data path {folder} has no rain/ folder; each data path must contain rain/ and norain/ "
                    "(or real_world/ + real_world_gt/ for SPA-Data)")


def require_pairs(scan: FolderScan) -> list[tuple[str, str]]:
    """The pairs of a scan; ``DataError`` for an unpaired rainy image or no pairs at all."""
    if scan.unpaired_rain:
        first = scan.unpaired_rain[0]
        more = f" (and {len(scan.unpaired_rain) - 1} more)" if len(scan.unpaired_rain) > 1 else ""
        raise DataError(f"rainy image {first} has no clean partner in {scan.clean_dir}{more}")
    if not scan.pairs:
        raise DataError(f"data path {scan.folder} yields no rain/clean pairs (is rain/ empty?)")
    return scan.pairs


def find_pairs(folder: str, stacked_rain_half: Optional[str] = None) -> list[tuple[str, str]]:
    """(rain path, clean path) pairs of a data folder (any layout of ``scan_folder``), sorted.

    Raises ``DataError`` for a rainy image without its clean partner or a folder without pairs.
    """
    return require_pairs(scan_folder(folder, stacked_rain_half))


def find_images(folder: str) -> tuple[str, list[str]]:
    """(image folder, image paths) of a folder of rainy images only: the first of ``IMAGE_FOLDERS``
    below ``folder`` that holds images (RealInt, a folder to derain); empty list when none does."""
    for sub in IMAGE_FOLDERS:
        d = os.path.join(folder, sub) if sub else folder
        if os.path.isdir(d) and list_images(d):
            return d, [os.path.join(d, f) for f in list_images(d)]
    return folder, []
