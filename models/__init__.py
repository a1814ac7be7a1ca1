"""Model registry: ``build_model(name, **hparams)`` and ``build_encoder(**hparams)``.

Every backbone follows one contract: ``model(x, z=None)`` maps x (B,3,H,W) in [0,1] to the
restored image (same shape, [0,1] domain, not clamped); ``z`` (B,dim_in) switches CoI-M on.
A backbone declares ``size_multiple`` (inputs are padded to it) and, when it only works at
its training resolution, ``tile_size`` (inputs are tiled at it); callers read both through
``size_multiple(model)`` and ``tile_size(model)``. ``bf16_verified`` (default: none)
names the modes ("plain", "coic") whose bf16 output is shown as accurate as float32: there
``test_model.py`` runs bf16 by default on a CPU that computes it natively (``utils.eval.precision``).
``channels_last_throughout`` (default: False) says that, in channels-last, every convolution reads a
channels-last map (no whole-map layout copies); IDT and DRSformer do not declare it, because their
token/map round trips around depthwise convolutions run faster in the default layout on CPUs without bf16.

``BACKBONES`` is the only list of backbones, and its entry is all that other code knows of one: its
training settings (``Training``, which ``utils.train.recipes`` turns into the Trainer's recipe), its
costliest convolution (the roofline benchmark), a summary and citation (the docs' tables) and its
published weights and code, if any. Tests, benchmarks, tools and docs tables iterate over it, so a
new backbone is its model file, its entry here and its ``train_<name>.py`` (``tests/test_toy_backbone.py``).
Data kept elsewhere per backbone (the published files' download data, the published code's adapter)
is keyed by name and raises ``RegistryError`` (naming the backbone and the file to edit) when it
disagrees with the entries here.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

import torch.nn as nn

from utils.errors import ModelConfigError


class ConvShape(NamedTuple):
    """A convolution of the backbone: what ``benchmarks.roofline`` times plain and modulated."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    groups: int = 1


@dataclass(frozen=True)
class Flag:
    """A backbone's own training flag: ``--name`` with type and default (also a model hyper-parameter when ``model``)."""

    type: type
    default: Any
    help: str
    model: bool = True  # a model hyper-parameter (stored in checkpoints, used to rebuild the model)
    nargs: Optional[str] = None
    init_only: bool = False  # passed to the model at construction in training only (e.g. an init file)


# Learning-rate schedules, as data (``utils.train.recipes`` builds the scheduler).
@dataclass(frozen=True)
class MultiStep:
    """The rate times ``gamma`` at each epoch listed by the backbone flag ``--<flag>`` (stepped per epoch)."""

    flag: str
    gamma: float


@dataclass(frozen=True)
class CosineOverRun:
    """Cosine annealing to ``eta_min`` over the whole run (stepped per epoch)."""

    eta_min: float


@dataclass(frozen=True)
class CosineRestarts:
    """Cosine in consecutive cycles of ``periods`` iterations, cycle i ending at ``eta_mins[i]`` (stepped per iteration)."""

    periods: tuple[int, ...]
    eta_mins: tuple[float, ...]


Schedule = Union[MultiStep, CosineOverRun, CosineRestarts]


@dataclass(frozen=True)
class Training:
    """How a backbone is trained, as plain data: ``utils.train.recipes`` builds the Trainer's recipe
    from it (models import nothing of training). The values are the reference run's, and the
    defaults of ``train_<name>.py``."""

    batch_size: int
    crop_size: int
    lr: float
    tot_iters: int
    stage1_iters: int
    contra_loss_weight: float
    # A class of losses.py, built without arguments: an image criterion ``(out, clean)`` applied to the
    # final image, or an objective ``(model, rain, clean, z) -> (loss, out)`` that runs the model itself.
    loss: str
    optimizer: str = "adam"  # "adam", or "adamw" (weight decay 1e-4 on the backbone): utils/train/recipes.py
    schedule: Optional[Schedule] = None  # None: a constant rate
    grad_clip: Optional[float] = None  # max gradient norm of all model parameters (CoI-M included), as published
    # Where --exemplars published searches the most different rain layer: "batch" (the current
    # batch, published BRN and IDT) or "archive" (the last 64 images, the other published scripts).
    rain_pool: str = "archive"
    seed: int = 0
    explode_threshold: Optional[float] = 10.0  # skip a step whose output leaves [-t, t] (reference: DGUNet)
    flags: dict[str, Flag] = field(default_factory=dict)
    # Model hyper-parameters that take the value of a training flag: {hyper-parameter: flag}.
    hparams_from_flags: dict[str, str] = field(default_factory=dict)
    demo: dict = field(default_factory=dict)  # flag overrides for --demo (small, CPU)
    # --tiny: the smallest configuration that still runs every code path (tests, smoke runs; seconds
    # on a CPU). Keys naming a flag (batch_size, crop_size, a backbone flag) replace its default; any
    # other key is a model hyper-parameter without a flag (e.g. a width the reference hard-codes).
    tiny: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: everything other code may know of it without importing its module."""

    name: str
    target: str  # "module:Class", imported on first use so that one backbone's optional dependency never breaks another
    summary: str  # what it is, in a few words (the README's table)
    citation: str  # "Authors et al., year" of its paper
    training: Training
    costliest_conv: ConvShape  # its costliest modulated convolution (benchmarks/roofline.py)
    # Names of the authors' released checkpoints of this backbone (``--test_model coic-brn``); their
    # files (paths, git blob ids) are download data and live in ``models.pretrained.PUBLISHED_MODELS``.
    published_weights: tuple[str, ...] = ()
    # "module:Class" of its counterpart in the authors' repository (github Schizophreni/CoIC), which
    # the benchmarks time side by side (``benchmarks/published.py``); None: the paper has none.
    published_code: Optional[str] = None


class RegistryError(Exception):
    """Per-backbone data that disagrees with ``BACKBONES`` (a bug): says which backbone and which file to edit."""


def _milestones(epochs: list, gamma: float) -> Flag:
    return Flag(int, epochs, f"epochs at which the learning rate is multiplied by {gamma}", model=False, nargs="+")


# Each entry's training settings are those of the authors' train_<name>.py (tests/test_recipes.py
# types them in from there); demo and tiny are this project's (docs/demo.md).
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone(
        "BRN", "models.brn:BRN", "bilateral recurrent CNN", "Ren et al., 2020",
        Training(batch_size=12, crop_size=100, lr=1e-3, tot_iters=260000, stage1_iters=40000,
                 contra_loss_weight=0.2, loss="SSIMLoss", schedule=MultiStep("milestone", 0.2), rain_pool="batch",
                 flags={"inter_iter": Flag(int, 8, "number of recurrent iterations"),
                        "milestone": _milestones([30, 50, 80], 0.2)},
                 # The demo trains CoIC from the first iteration with an encoder that learns in minutes (a
                 # sharper contrastive temperature, a key encoder that follows within ~100 steps) and colours
                 # shuffled per item (docs/demo.md). A checkpoint every 100 iterations; the demo evaluates the
                 # one whose worst rain type gains most on the val split (utils/train/selection.py).
                 demo=dict(inter_iter=2, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=0, save_freq=100,
                           keep_checkpoints=8, temperature=0.1, momentum=0.99, channel_shuffle=True,
                           probe_freq=100),
                 tiny=dict(inter_iter=1, batch_size=2, crop_size=16)),
        ConvShape(96, 32, 3), ("baseline-brn", "coic-brn"), "models.BRN_CoIM:BRN"),
    Backbone(
        "RCDNet", "models.rcdnet:RCDNet", "rain convolutional dictionary, unfolded", "Wang et al., 2020",
        # Stage-output MSE on 0-255.
        Training(batch_size=16, crop_size=64, lr=1e-3, tot_iters=260000, stage1_iters=40000,
                 contra_loss_weight=50.0, loss="RCDNetStageLoss", schedule=MultiStep("milestone", 0.2),
                 flags={
                     "num_map": Flag(int, 32, "number of rain maps"),
                     "num_channel": Flag(int, 32, "channels of the background features"),
                     "num_block": Flag(int, 4, "residual blocks per proximal network"),
                     "inter_iter": Flag(int, 17, "number of unfolded stages"),
                     "milestone": _milestones([25, 50, 75], 0.2),
                     "rain_kernel": Flag(str, None, "initial rain kernels: the original RCDNet kernel.mat (key C9), "
                                         "or .npy/.pt; default: generated streak kernels", init_only=True),
                     "rain_kernels": Flag(str, "shared", "shared: one rain-kernel tensor for the first and the later "
                                          "stages, as the published code; separate: two parameters from the same "
                                          "start"),
                 },
                 demo=dict(inter_iter=3, num_block=1, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=250,
                           save_freq=200),
                 tiny=dict(inter_iter=2, num_block=1, num_map=4, num_channel=4, batch_size=2, crop_size=16)),
        ConvShape(35, 35, 3), ("baseline-rcdnet", "coic-rcdnet"), "models.RCDNet_CoIM:RCDNet"),
    Backbone(
        "DGUNet", "models.dgunet:DGUNet", "deep generalized unfolding", "Mou et al., 2022",
        # Charbonnier + 0.05 edge over all stages.
        Training(batch_size=16, crop_size=128, lr=2e-4, tot_iters=400000, stage1_iters=40000,
                 contra_loss_weight=0.2, loss="StageSumLoss", schedule=CosineOverRun(1e-6), seed=1234,
                 flags={"depth": Flag(int, 5, "number of middle stages (the network has depth + 2 stages)")},
                 demo=dict(depth=1, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=250, save_freq=200),
                 tiny=dict(depth=1, n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, batch_size=2, crop_size=16)),
        ConvShape(80, 80, 3), published_code="models.DGUNet_CoIM:DGUNet"),
    Backbone(
        "IDT", "models.idt:IDT", "image deraining transformer", "Xiao et al., 2022",
        Training(batch_size=8, crop_size=128, lr=1e-4, tot_iters=400000, stage1_iters=40000,
                 contra_loss_weight=0.2, loss="SSIMLoss", schedule=MultiStep("milestone", 0.1), rain_pool="batch",
                 flags={"embed_dim": Flag(int, 32, "channels of the first transformer stage"),
                        "milestone": _milestones([100, 250, 350], 0.1)},
                 # IDT's position tables are built for one input size: its training crop.
                 hparams_from_flags={"img_size": "crop_size"},
                 demo=dict(embed_dim=16, batch_size=2, crop_size=64, tot_iters=300, stage1_iters=150, save_freq=100),
                 # 64 is the smallest img_size (= crop) IDT supports; mlp_ratio 1 keeps the 64x64 FFNs cheap
                 # while every depthwise CoI-M generator keeps a non-empty hidden layer (width >= 16).
                 tiny=dict(embed_dim=16, depths=[1] * 9, num_heads=[1] * 9, mlp_ratio=1.0, batch_size=1,
                           crop_size=64)),
        ConvShape(256, 256, 3, groups=256), published_code="models.IDT_CoIM:IDT"),
    Backbone(
        "DRSformer", "models.drsformer:DRSformer", "sparse top-k attention transformer with experts",
        "Chen et al., 2023",
        # Its cyclic cosine's periods sum to more than its run, as the reference's do.
        Training(batch_size=4, crop_size=128, lr=3e-4, tot_iters=400000, stage1_iters=40000,
                 contra_loss_weight=0.2, loss="L1Loss", optimizer="adamw", seed=100, grad_clip=0.01,
                 schedule=CosineRestarts((92000, 208000, 200000), (3e-4, 1e-4, 1e-6)),
                 flags={"dim": Flag(int, 48, "channels of the first transformer level"),
                        "num_blocks": Flag(int, [4, 6, 6, 8], "transformer blocks per level", nargs="+")},
                 demo=dict(dim=16, num_blocks=[1, 1, 1, 1], batch_size=2, crop_size=48, tot_iters=300,
                           stage1_iters=150, save_freq=100),
                 tiny=dict(dim=16, num_blocks=[1, 1, 1, 1], heads=[1, 1, 2, 2], batch_size=2, crop_size=16)),
        ConvShape(254, 254, 5, groups=254), published_code="models.DRSformer_CoIM:DRSformer"),
)}


class _Targets(Mapping):
    """name -> "module:Class", read through to ``BACKBONES`` (a backbone is registered there)."""

    def __getitem__(self, name: str) -> str:
        return BACKBONES[name].target

    def __iter__(self) -> Iterator[str]:
        return iter(BACKBONES)

    def __len__(self) -> int:
        return len(BACKBONES)

    def __repr__(self) -> str:
        return repr(dict(self))


MODELS: Mapping[str, str] = _Targets()

__all__ = ["Backbone", "BACKBONES", "ConvShape", "CosineOverRun", "CosineRestarts", "Flag", "MultiStep",
           "Training", "MODELS", "RegistryError", "available_models", "backbone", "build_model",
           "build_encoder", "model_class", "size_multiple", "tile_size"]


def available_models() -> list[str]:
    return list(BACKBONES)


def backbone(name: str) -> Backbone:
    """The registry entry ``name``; an unknown name raises ``ModelConfigError`` listing the valid ones."""
    if name not in BACKBONES:
        raise ModelConfigError(f"unknown --model_name {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def model_class(name: str) -> type:
    module, cls = backbone(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, **hparams) -> nn.Module:
    """Instantiate backbone ``name`` with its reference hyper-parameters overridden by ``hparams``."""
    cls = model_class(name)
    try:
        return cls(**hparams)
    except TypeError as exc:  # an unknown hyper-parameter name
        raise ModelConfigError(f"{name}: {exc}") from None


def build_encoder(**hparams) -> nn.Module:
    """The MoCo rain-/detail-aware encoder; ``encoder(x)`` returns z (B,dim) from the key encoder."""
    from models.encoder import ContrastiveEncoder

    return ContrastiveEncoder(**hparams)


def size_multiple(model: Union[nn.Module, type]) -> int:
    """What H and W of ``model``'s input are padded to (an instance, or a class for its reference
    configuration): its declared ``size_multiple``, 1 when it declares none."""
    return getattr(model, "size_multiple", 1)


def tile_size(model: Union[nn.Module, type]) -> Optional[int]:
    """The one input side ``model`` works at (larger inputs are tiled at it), or None for any size:
    its declared ``tile_size``."""
    return getattr(model, "tile_size", None)
