"""Per-backbone training recipes, declared in one place.

A recipe is everything that differs between backbones in training: the loss, the
optimizers and their schedules, the reference batch/crop/iterations, the backbone's own
command-line flags, the smaller configuration the ``--demo`` run uses, and the tiny one
that tests and smoke runs use (``--tiny``). The Trainer reads nothing else about a backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from losses import ImageLoss, L1Loss, RCDNetStageLoss, SSIMLoss, StageSumLoss
from utils.train.schedulers import CyclicCosineRestart


# Fused optimizers: one kernel per step instead of a loop of small ones (3x faster on a CPU), and they
# take the Trainer's skip verdict as a device tensor (``found_inf``), so a skipped step needs no host sync.
def adam_pair(base: list, tran: list, args) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam with the same learning rate for the backbone and for the CoIC parameters."""
    return torch.optim.Adam(base, lr=args.lr, fused=True), torch.optim.Adam(tran, lr=args.lr, fused=True)


def adamw_pair(base: list, tran: list, args) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW; weight decay 1e-4 on the backbone, AdamW's default (0.01) on the CoIC parameters."""
    return (torch.optim.AdamW(base, lr=args.lr, weight_decay=1e-4, fused=True),
            torch.optim.AdamW(tran, lr=args.lr, fused=True))


def multistep(milestones_flag: str, gamma: float) -> Callable:
    """MultiStepLR at the epochs given by ``--<milestones_flag>``."""
    def make(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(getattr(args, milestones_flag)),
                                                    gamma=gamma)
    return make


def cosine_over_run(eta_min: float) -> Callable:
    """CosineAnnealingLR over the whole run, in epochs (DGUNet)."""
    def make(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int):
        epochs = args.tot_iters // iters_per_epoch + 1
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=eta_min)
    return make


def cosine_restarts(periods: list, eta_mins: list) -> Callable:
    """Cyclic cosine with restarts in iterations (DRSformer; its periods sum to more than its run)."""
    def make(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int):
        return CyclicCosineRestart(optimizer, periods, eta_mins)
    return make


@dataclass(frozen=True)
class Flag:
    """A backbone flag: ``--name`` with type and default (also a model hyper-parameter when ``model``)."""
    type: type
    default: Any
    help: str
    model: bool = True  # a model hyper-parameter (stored in checkpoints, used to rebuild the model)
    nargs: Optional[str] = None
    init_only: bool = False  # passed to the model at construction in training only (e.g. an init file)


@dataclass(frozen=True)
class Recipe:
    model_name: str
    batch_size: int
    crop_size: int
    lr: float
    tot_iters: int
    stage1_iters: int
    contra_loss_weight: float
    make_loss: Callable[[], nn.Module]
    make_optimizers: Callable = adam_pair
    make_scheduler: Optional[Callable] = None
    scheduler_unit: str = "epoch"  # "epoch" or "iter": when the scheduler steps
    grad_clip: Optional[float] = None  # max gradient norm of the backbone parameters
    seed: int = 0
    explode_threshold: Optional[float] = 10.0  # skip a step whose output leaves [-t, t] (reference: DGUNet)
    derived_hparams: Optional[Callable] = None  # args -> model hyper-parameters that follow other flags
    flags: dict = field(default_factory=dict)
    demo: dict = field(default_factory=dict)  # flag overrides for --demo (small, CPU)
    # --tiny: the smallest configuration that still runs every code path (tests, smoke runs; seconds
    # on a CPU). Keys naming a flag (batch_size, crop_size, a backbone flag) replace its default; any
    # other key is a model hyper-parameter without a flag (e.g. a width the reference hard-codes).
    tiny: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # BRN (reference train_BRN.py): SSIM loss, Adam 1e-3, LR x0.2 at epochs 30/50/80.
    "BRN": Recipe(
        model_name="BRN", batch_size=12, crop_size=100, lr=1e-3, tot_iters=260000, stage1_iters=40000,
        contra_loss_weight=0.2, make_loss=lambda: ImageLoss(SSIMLoss()),
        make_scheduler=multistep("milestone", 0.2), scheduler_unit="epoch",
        flags={
            "inter_iter": Flag(int, 8, "number of recurrent iterations"),
            "milestone": Flag(int, [30, 50, 80], "epochs at which the learning rate is multiplied by 0.2",
                              model=False, nargs="+"),
        },
        # Measured on 2 CPU cores: see docs/demo.md.
        # A checkpoint every 25 iterations of CoIC; the demo evaluates the one whose worst rain type gains
        # most on training pictures (utils/train/selection.py).
        demo=dict(inter_iter=2, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=250, save_freq=25,
                  keep_checkpoints=15),
        tiny=dict(inter_iter=1, batch_size=2, crop_size=16),
    ),
    # RCDNet (reference train_RCDNet.py): stage-output MSE on 0-255, Adam 1e-3, x0.2 at epochs 25/50/75.
    "RCDNet": Recipe(
        model_name="RCDNet", batch_size=16, crop_size=64, lr=1e-3, tot_iters=260000, stage1_iters=40000,
        contra_loss_weight=50.0, make_loss=RCDNetStageLoss,
        make_scheduler=multistep("milestone", 0.2), scheduler_unit="epoch",
        flags={
            "num_map": Flag(int, 32, "number of rain maps"),
            "num_channel": Flag(int, 32, "channels of the background features"),
            "num_block": Flag(int, 4, "residual blocks per proximal network"),
            "inter_iter": Flag(int, 17, "number of unfolded stages"),
            "milestone": Flag(int, [25, 50, 75], "epochs at which the learning rate is multiplied by 0.2",
                              model=False, nargs="+"),
            "rain_kernel": Flag(str, None, "initial rain kernels: the original RCDNet kernel.mat (key C9), "
                                "or .npy/.pt; default: generated streak kernels", init_only=True),
            "rain_kernels": Flag(str, "shared", "shared: one rain-kernel tensor for the first and the later "
                                 "stages, as the published code; separate: two parameters from the same start"),
        },
        demo=dict(inter_iter=3, num_block=1, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=250,
                  save_freq=200),
        tiny=dict(inter_iter=2, num_block=1, num_map=4, num_channel=4, batch_size=2, crop_size=16),
    ),
    # DGUNet (reference train_DGUNet.py): Charbonnier + 0.05 edge over all stages, Adam 2e-4, cosine to 1e-6.
    "DGUNet": Recipe(
        model_name="DGUNet", batch_size=16, crop_size=128, lr=2e-4, tot_iters=400000, stage1_iters=40000,
        contra_loss_weight=0.2, make_loss=StageSumLoss, seed=1234,
        make_scheduler=cosine_over_run(1e-6), scheduler_unit="epoch",
        flags={"depth": Flag(int, 5, "number of middle stages (the network has depth + 2 stages)")},
        demo=dict(depth=1, batch_size=4, crop_size=48, tot_iters=600, stage1_iters=250, save_freq=200),
        tiny=dict(depth=1, n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, batch_size=2, crop_size=16),
    ),
    # IDT (reference train_IDT.py): -SSIM, Adam 1e-4, x0.1 at epochs 100/250/350.
    "IDT": Recipe(
        model_name="IDT", batch_size=8, crop_size=128, lr=1e-4, tot_iters=400000, stage1_iters=40000,
        contra_loss_weight=0.2, make_loss=lambda: ImageLoss(SSIMLoss()),
        make_scheduler=multistep("milestone", 0.1), scheduler_unit="epoch",
        # IDT's position tables are built for one input size: its training crop.
        derived_hparams=lambda args: {"img_size": args.crop_size},
        flags={
            "embed_dim": Flag(int, 32, "channels of the first transformer stage"),
            "milestone": Flag(int, [100, 250, 350], "epochs at which the learning rate is multiplied by 0.1",
                              model=False, nargs="+"),
        },
        demo=dict(embed_dim=16, batch_size=2, crop_size=64, tot_iters=300, stage1_iters=150, save_freq=100),
        # 64 is the smallest img_size (= crop) IDT supports; mlp_ratio 1 keeps the 64x64 FFNs cheap while
        # every depthwise CoI-M generator keeps a non-empty hidden layer (width >= 16).
        tiny=dict(embed_dim=16, depths=[1] * 9, num_heads=[1] * 9, mlp_ratio=1.0, batch_size=1, crop_size=64),
    ),
    # DRSformer (reference train_DRSformer.py): L1, AdamW 3e-4, cyclic cosine per iteration, clip 0.01.
    "DRSformer": Recipe(
        model_name="DRSformer", batch_size=4, crop_size=128, lr=3e-4, tot_iters=400000, stage1_iters=40000,
        contra_loss_weight=0.2, make_loss=lambda: ImageLoss(L1Loss()), make_optimizers=adamw_pair, seed=100,
        make_scheduler=cosine_restarts([92000, 208000, 200000], [3e-4, 1e-4, 1e-6]), scheduler_unit="iter",
        grad_clip=0.01,
        flags={
            "dim": Flag(int, 48, "channels of the first transformer level"),
            "num_blocks": Flag(int, [4, 6, 6, 8], "transformer blocks per level", nargs="+"),
        },
        demo=dict(dim=16, num_blocks=[1, 1, 1, 1], batch_size=2, crop_size=48, tot_iters=300, stage1_iters=150,
                  save_freq=100),
        tiny=dict(dim=16, num_blocks=[1, 1, 1, 1], heads=[1, 1, 2, 2], batch_size=2, crop_size=16),
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}: add one to RECIPES in utils/train/recipes.py "
                         f"(recipes exist for: {', '.join(RECIPES)})")
    return RECIPES[name]
