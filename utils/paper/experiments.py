"""The paper's experiments, declared as data: what is trained, on which sets, how it is evaluated,
and the paper's numbers beside which ours are shown.

``reproduce.py`` runs them (``utils/paper/runner.py`` turns a declaration into ordinary
``train_*.py`` / ``test_model.py`` / ``python -m analysis.*`` commands; ``utils/paper/collect.py``
writes the tables). Nothing here runs anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from utils.data.demo import RAIN_TYPES

__all__ = ["Variant", "PLAIN", "COIC", "Training", "Evaluation", "Analysis", "Experiment", "EXPERIMENTS",
           "SYNTHETIC_TESTS", "SYNTHETIC_TRAIN", "PaperValue", "PAPER_RESULTS", "PAPER_PROTOCOL", "PAPER_SOURCES",
           "DEMO_SEEDS", "experiment"]

# The paper's column order (the published README's table) and the published README's --data_paths order.
SYNTHETIC_TESTS = ("Rain200L", "Rain200H", "Rain800", "DID", "DDN")
SYNTHETIC_TRAIN = ("Rain200H", "Rain200L", "Rain800", "DID", "DDN")


@dataclass(frozen=True)
class Variant:
    """How a model is trained and evaluated: the paper's "w/o CoIC" or "w/ CoIC"."""
    key: str  # in folder names
    label: str
    contra_loss_weight: Optional[float]  # None: the recipe's weight
    stage1_iters: Optional[int]  # None: the experiment's (the paper: 40000)
    load_mode: str  # test_model.py --load_mode


# The published README's flags: without CoIC the contrastive weight is 0 and stage 1 never ends.
PLAIN = Variant("plain", "w/o CoIC", 0.0, 40_000_000, "normal")
COIC = Variant("coic", "w/ CoIC", None, None, "tran")


@dataclass(frozen=True)
class Training:
    """Every backbone x variant x seed trained on ``train_sets``, into ``<runs_root>/<group>/<run>``."""
    group: str
    train_sets: tuple[str, ...]
    backbones: tuple[str, ...]
    variants: tuple[Variant, ...] = (PLAIN, COIC)
    seeds: tuple[Optional[int], ...] = (None,)  # None: the recipe's seed (no --seed flag)
    stage1_iters: int = 40_000  # stage 1 of the CoIC runs (the published README)
    flags: tuple[tuple[str, object], ...] = ()  # further train flags (the demo's small configuration)
    backbones_fixed: bool = False  # --models may not change them (the paper ran spa with DRSformer only)


@dataclass(frozen=True)
class Evaluation:
    """``test_model.py --testset`` over ``test_sets``: PSNR/SSIM, or NIQE."""
    test_sets: tuple[str, ...]
    metrics: str = "psnr"  # "psnr" (PSNR and SSIM, under reproduce.py's --metric_protocol) or "niqe"
    flags: tuple[str, ...] = ()  # further test_model.py flags


@dataclass(frozen=True)
class Analysis:
    """One ``python -m analysis.<tool>`` run on the CoIC model of the experiment's training."""
    tool: str
    title: str
    checkpoint_flag: str  # how the tool is given the checkpoint
    data: tuple[str, ...]  # dataset names, each read from its ``split`` folder
    split: str
    flags: tuple[str, ...]
    outputs: tuple[str, ...]  # files that are there when it has run
    summary: Optional[str] = None  # a Markdown file it writes, shown in the experiment's table


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    training: Training
    evaluation: Optional[Evaluation] = None
    analyses: tuple[Analysis, ...] = ()
    table: str = "paper"  # "paper", "seeds" (the demo), "niqe", "analysis"
    demo: bool = False  # runs on the built-in demo data, on a CPU


# The demo: BRN's demo recipe (utils/train/recipes.py, what ``train_BRN.py --demo`` trains), with and without
# CoIC, DEMO_SEEDS seeds each, so that the table can pair the two models seed by seed.
def _demo_training() -> Training:
    from utils.train.recipes import get_recipe

    demo = dict(get_recipe("BRN").demo)
    stage1 = demo.pop("stage1_iters")
    # The pairs compare each run's last checkpoint: a resume point every 200 iterations is enough, and
    # eight runs keep three checkpoints each. The probe needs held-out folders (reproduce.py coic_effect).
    demo.pop("keep_checkpoints", None)
    demo.pop("probe_freq", None)
    demo["save_freq"] = 200
    # A switch typed on its own (``--channel_shuffle``); the runner writes a None value as a bare flag.
    flags = tuple((k, None if v is True else v) for k, v in demo.items() if v is not False) + (("num_workers", 0),)
    return Training("demo", RAIN_TYPES, ("BRN",), seeds=DEMO_SEEDS, stage1_iters=stage1, flags=flags)


DEMO_SEEDS = (0, 1, 2, 3)

_SPA_TRAINING = Training("spa", SYNTHETIC_TRAIN + ("SPA",), ("DRSformer",), backbones_fixed=True)

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("main", "each backbone trained on the five synthetic sets, without and with CoIC",
               Training("main", SYNTHETIC_TRAIN, ("BRN", "RCDNet", "DGUNet", "IDT", "DRSformer")),
               Evaluation(SYNTHETIC_TESTS)),
    Experiment("spa", "DRSformer trained on the five synthetic sets plus SPA-Data, without and with CoIC",
               _SPA_TRAINING, Evaluation(SYNTHETIC_TESTS + ("SPA",))),
    # NIQE as the published eval_niqe.py computes it: pyiqa's niqe, on the grey luminance.
    Experiment("realint", "the spa models on real rain (RealInt, no ground truth), scored by NIQE",
               _SPA_TRAINING, Evaluation(("RealInt",), metrics="niqe", flags=("--niqe_channel", "gray")),
               table="niqe"),
    # The published analysis scripts: the map and the relationships of training images (up to 400 per set,
    # the pooled feature map, UMAP on the sphere), the CoI-M temperatures of DGUNet on 100 Rain800 test images.
    Experiment("analysis", "representation map, dataset relationships and CoI-M temperatures of a CoIC model",
               Training("main", SYNTHETIC_TRAIN, ("DGUNet",), variants=(COIC,)), table="analysis",
               analyses=(
                   Analysis("analysis.representation_map", "representation map (UMAP on the sphere)", "--feat_ext",
                            SYNTHETIC_TESTS, "train", ("--feature", "feat", "--projection", "sphere",
                                                       "--num_images", "400"),
                            ("embeddings.csv", "projection_sphere.csv", "representation_sphere.png")),
                   Analysis("analysis.dataset_relationships", "dataset relationships", "--feat_ext",
                            SYNTHETIC_TESTS, "train", ("--num_images", "400"),
                            ("relationships.csv", "relationships.md", "relationships.png"), "relationships.md"),
                   Analysis("analysis.modulation_temperature", "CoI-M kernel temperature per layer", "--test_model",
                            ("Rain800",), "test", ("--num_images", "100"),
                            ("temperature_layers.csv", "temperature.md", "temperature.png"), "temperature.md"),
               )),
    Experiment("demo", f"the machinery in miniature: BRN on the demo data, without and with CoIC, "
               f"{len(DEMO_SEEDS)} seeds", _demo_training(),
               Evaluation(RAIN_TYPES), table="seeds", demo=True),
)}


def experiment(name: str) -> Experiment:
    from utils.errors import UserError

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


# ------------------------------------------------------------------ the paper's numbers
@dataclass(frozen=True)
class PaperValue:
    psnr: Optional[float]
    ssim: Optional[float] = None


# The published README: "We evaluate PSNR/SSIM referred to the Python code from this repository:
# https://github.com/leftthomas/Restormer", which is our ``coic`` protocol (utils/metrics.py).
PAPER_PROTOCOL = "coic"

PAPER_SOURCES: dict[str, str] = {
    "spa": "published README (github.com/Schizophreni/CoIC, commit 8c99e73), table under \"Real-world deraining "
           "on RealInt\": DRSformer trained adding SPAData, PSNR only",
    # The paper's own tables (arXiv 2404.12091, ICLR 2024) could not be read from the sources this
    # project can reach: left empty rather than guessed. Add them here as (experiment, backbone,
    # variant key, test set) -> PaperValue, with the table they come from.
    "main": "no value: the paper's main table (arXiv 2404.12091) was not readable from this project's sources",
    "realint": "no value: neither the paper's text available here nor the published README gives NIQE on RealInt",
}

_SPA_PSNR = {
    "plain": (39.32, 29.27, 28.85, 34.91, 33.71, 45.46),
    "coic": (39.70, 30.31, 29.73, 35.02, 33.94, 46.03),
}

PAPER_RESULTS: dict[tuple[str, str, str, str], PaperValue] = {
    ("spa", "DRSformer", variant, testset): PaperValue(value)
    for variant, values in _SPA_PSNR.items() for testset, value in zip(SYNTHETIC_TESTS + ("SPA",), values)
}
