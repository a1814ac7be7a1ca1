"""The public rain datasets, each described once: folder under the data root, splits, pairing, official counts."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from utils.data.layouts import RULE_PREFIX, RULE_SAME, RULE_VARIANT, RULE_X2, PairRule
from utils.errors import DataError

__all__ = ["DatasetSpec", "DATASET_SPECS", "dataset_spec", "find_dataset_folder", "split_folder"]


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


# Conventions checked against each dataset's page and its authors' code (see docs/datasets.md).
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


def split_folder(dataset_folder: str, spec: DatasetSpec, split: str) -> str:
    """The folder of ``split`` inside a dataset's folder."""
    sub = spec.splits[split]
    return os.path.join(dataset_folder, sub) if sub else dataset_folder
