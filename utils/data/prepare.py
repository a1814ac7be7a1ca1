"""``python datasets.py prepare rain800|did RAW OUT``: split raw side-by-side pair images into rain/ + norain/."""
from __future__ import annotations

import logging
import os

import numpy as np

from utils.data.specs import dataset_spec
from utils.errors import DataError
from utils.images import UnreadableImageError, list_images, number_key, read_rgb8, write_array
from utils.tables import write_csv

logger = logging.getLogger(__name__)

__all__ = ["prepare"]

_DID_DENSITIES = ("rain_heavy", "rain_medium", "rain_light")  # the merge order


def _images_below(folder: str) -> list[str]:
    """Images directly in ``folder``, else in its only sub-folder that has images (DID's train2018new/)."""
    direct = list_images(folder)
    if direct:
        return [os.path.join(folder, f) for f in sorted(direct, key=number_key)]
    subs = [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    with_images = [d for d in subs if list_images(d)]
    if len(with_images) == 1:
        return [os.path.join(with_images[0], f) for f in sorted(list_images(with_images[0]), key=number_key)]
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
    sources = [os.path.join(raw, f) for f in sorted(list_images(raw), key=number_key)]
    if not sources:
        hint = " (nor Rain_Heavy/Rain_Medium/Rain_Light folders)" if kind == "did" else ""
        raise DataError(f"prepare {kind}: {raw} holds no images{hint}")
    stems = [os.path.splitext(os.path.basename(s))[0] for s in sources]
    numbers = [int(s) for s in stems] if all(s.isdigit() for s in stems) else list(range(1, len(stems) + 1))
    if kind == "rain800":
        return [(src, f"rain-{n:03d}.png", f"norain-{n:03d}.png") for src, n in zip(sources, numbers)]
    return [(src, f"{n}.png", f"{n}.png") for src, n in zip(sources, numbers)]


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
        arr = read_rgb8(src)
        if arr.shape[1] % 2:
            raise DataError(f"{src} is not a side-by-side pair: its width {arr.shape[1]} is odd")
        half = arr.shape[1] // 2
        left, right = arr[:, :half], arr[:, half:]
        rain, clean = (left, right) if spec.stacked_rain_half == "left" else (right, left)
        for img, path in ((rain, os.path.join(rain_dir, rain_name)), (clean, os.path.join(clean_dir, clean_name))):
            if os.path.exists(path):
                try:
                    same = np.array_equal(read_rgb8(path), img)
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
            write_array(np.ascontiguousarray(img), path)
    write_csv(os.path.join(out, "sources.csv"), ["rain", "norain", "source"],
              [[r, c, os.path.abspath(s)] for s, r, c in plan])
    return counts
