"""Per-backbone training recipes, declared in one place.

A recipe is everything that differs between backbones in training: the loss, the
optimizers and their schedules, the reference batch/crop/iterations, the backbone's own
command-line flags, and the smaller configuration the ``--demo`` run uses. The Trainer
reads nothing else about a backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from losses import SSIMLoss


class ImageLoss(nn.Module):
    """criterion(model(rain, z), clean): for backbones trained on their final image only."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, rain: Tensor, clean: Tensor, z: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        out = model(rain, z)
        return self.criterion(out, clean), out


def adam_pair(base: list, tran: list, args) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam with the same learning rate for the backbone and for the CoIC parameters."""
    return torch.optim.Adam(base, lr=args.lr), torch.optim.Adam(tran, lr=args.lr)


def multistep(milestones_flag: str, gamma: float) -> Callable:
    def make(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(getattr(args, milestones_flag)),
                                                    gamma=gamma)
    return make


@dataclass(frozen=True)
class Flag:
    """A backbone flag: ``--name`` with type and default (also a model hyper-parameter when ``model``)."""
    type: type
    default: Any
    help: str
    model: bool = True
    nargs: Optional[str] = None


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
    flags: dict = field(default_factory=dict)
    demo: dict = field(default_factory=dict)  # flag overrides for --demo (small, CPU)


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
        # Measured on 2 CPU cores: see README (demo).
        demo=dict(inter_iter=3, batch_size=4, crop_size=48, tot_iters=1000, stage1_iters=400, save_freq=250),
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}; recipes exist for: {', '.join(RECIPES)}")
    return RECIPES[name]
