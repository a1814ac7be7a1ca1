"""``python datasets.py check ROOT``: every dataset under a data root paired as training and evaluation
pair it, counted against the official numbers, every image decoded."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from utils.data.layouts import STACKED, find_images, scan_folder
from utils.data.specs import DATASET_SPECS, DatasetSpec, find_dataset_folder, split_folder
from utils.errors import DataError
from utils.images import StackedHalf, UnreadableImageError, check_header, decode_native

__all__ = ["CheckResult", "check_split", "check_root", "format_check"]


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
    """(H, W) of an image, or raises UnreadableImageError: read as training reads it, or only its header
    (still refused where training would refuse it: larger than its decoder or the memory) unless ``full``."""
    if path not in cache:
        try:
            if full:
                cache[path] = decode_native(path)[0].shape[:2]
            else:
                header = check_header(path)
                cache[path] = (header.height, header.width)
        except UnreadableImageError as exc:
            cache[path] = exc
    if isinstance(cache[path], Exception):
        raise cache[path]
    return cache[path]


def check_split(spec: DatasetSpec, split: str, folder: str, full: bool = True, progress: bool = True) -> CheckResult:
    """Pair a dataset split as training/evaluation would and verify every image of it."""
    from tqdm import tqdm

    result = CheckResult(spec.name, split, folder, expected=spec.official.get(split))
    marker = spec.markers.get(split)
    if not os.path.isdir(os.path.join(folder, marker) if marker else folder):
        result.absent = True
        return result
    if not spec.ground_truth:
        _, images = find_images(folder)
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
    elif scan.layout.startswith(STACKED) and split == "train":
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
        for split in spec.splits:
            results.append(check_split(spec, split, split_folder(folder, spec, split), full, progress))
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

