"""Per-backbone training recipes, built from the registry.

A recipe is everything that differs between backbones in training: the loss, the
optimizers and their schedules, the reference batch/crop/iterations, the backbone's own
command-line flags, the smaller configuration the ``--demo`` run uses, and the tiny one
that tests and smoke runs use (``--tiny``). The Trainer reads nothing else about a backbone.

The values are plain data in each backbone's registry entry (``models.Training``); this module
turns them into the callables the Trainer runs: the loss class of ``losses.py`` it names, the
optimizer pair (``OPTIMIZERS``) and the scheduler of its schedule.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

import losses
from losses import ImageLoss
from models import BACKBONES, CosineOverRun, CosineRestarts, MultiStep, Schedule, Training
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
class Recipe:
    """A backbone's registry ``Training`` with the callables the Trainer runs, built from it.

    The plain settings are read through to ``training`` (``recipe.batch_size``, ``recipe.grad_clip``,
    ``recipe.flags``, ``recipe.demo``, ...): the registry entry is their only copy.
    """

    model_name: str
    training: Training
    make_loss: Callable[[], nn.Module]
    make_optimizers: Callable = adam_pair
    make_scheduler: Optional[Callable] = None
    scheduler_unit: str = "epoch"  # "epoch" or "iter": when the scheduler steps
    derived_hparams: Optional[Callable] = None  # args -> model hyper-parameters that follow other flags

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes``: a registry setting (``grad_clip=...``) goes to ``training``, a callable
        (``make_scheduler=...``) to the recipe."""
        own = {f.name for f in dataclasses.fields(self)}
        settings = {k: v for k, v in changes.items() if k not in own}
        return dataclasses.replace(self, training=dataclasses.replace(self.training, **settings),
                                   **{k: v for k, v in changes.items() if k in own})

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "training":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.training, name)


OPTIMIZERS: dict[str, Callable] = {"adam": adam_pair, "adamw": adamw_pair}


def make_loss(name: str) -> Callable[[], nn.Module]:
    """A builder of the loss ``losses.<name>``: an objective ``(model, rain, clean, z)`` as it is, an
    image criterion ``(out, clean)`` applied to the final image (``ImageLoss``)."""
    cls = getattr(losses, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"no loss class {name!r} in losses.py")
    if len(inspect.signature(cls.forward).parameters) == 5:  # self, model, rain, clean, z: an objective
        return cls
    return lambda: ImageLoss(cls())


def make_scheduler(schedule: Optional[Schedule]) -> tuple[Optional[Callable], str]:
    """(scheduler factory, unit it steps in) of a registry schedule."""
    if schedule is None:
        return None, "epoch"
    if isinstance(schedule, MultiStep):
        return multistep(schedule.flag, schedule.gamma), "epoch"
    if isinstance(schedule, CosineOverRun):
        return cosine_over_run(schedule.eta_min), "epoch"
    if isinstance(schedule, CosineRestarts):
        return cosine_restarts(list(schedule.periods), list(schedule.eta_mins)), "iter"
    raise TypeError(f"unknown schedule {schedule!r}")


def recipe_of(name: str, training: Training) -> Recipe:
    """The Trainer's recipe of backbone ``name`` from its registry ``Training``."""
    if training.optimizer not in OPTIMIZERS:
        raise ValueError(f"{name}: unknown optimizer {training.optimizer!r} in models/__init__.py; "
                         f"choose one of: {', '.join(OPTIMIZERS)}")
    scheduler, unit = make_scheduler(training.schedule)
    follows = dict(training.hparams_from_flags)
    return Recipe(
        model_name=name, training=training, make_loss=make_loss(training.loss),
        make_optimizers=OPTIMIZERS[training.optimizer], make_scheduler=scheduler, scheduler_unit=unit,
        derived_hparams=(lambda args: {k: getattr(args, flag) for k, flag in follows.items()}) if follows else None)


class _Recipes(Mapping):
    """name -> Recipe, read through to ``models.BACKBONES`` (a backbone's training is its registry entry's)."""

    def __getitem__(self, name: str) -> Recipe:
        return recipe_of(name, BACKBONES[name].training)

    def __iter__(self) -> Iterator[str]:
        return iter(BACKBONES)

    def __len__(self) -> int:
        return len(BACKBONES)


RECIPES: Mapping[str, Recipe] = _Recipes()


def get_recipe(name: str) -> Recipe:
    if name not in BACKBONES:
        raise ValueError(f"no training recipe for {name!r}: register the backbone, with its training settings, in "
                         f"models/__init__.py (registered: {', '.join(BACKBONES)})")
    return RECIPES[name]
