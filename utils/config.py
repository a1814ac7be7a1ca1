"""The typed configuration a Trainer runs on.

The command line builds it (``utils.options.parse_train_args``: values are the argparse
defaults, which come from the recipe); tests and scripts can build it the same way and change
fields with ``dataclasses.replace``. The backbone's own flags (``--milestone``, ``--inter_iter``,
...) differ per recipe, so they live in ``backbone`` and read as attributes too
(``config.milestone``), which is how the recipes' schedulers ask for them.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from utils.recipes import Recipe


@dataclass
class TrainConfig:
    model_name: str
    recipe: Recipe
    # run
    data_paths: str
    save_path: str
    save_freq: int
    keep_checkpoints: int
    log_freq: int
    image_freq: int
    no_resume: bool
    pretrained: Optional[str]
    pretrained_encoder: Optional[str]
    max_bad_steps: int
    check_every: int
    strict_data: bool
    seed: int
    num_workers: int
    cache_images: bool
    # device
    use_GPU: bool
    gpu_id: str
    device: Optional[str]
    amp: str
    channels_last: bool
    compile: bool
    sync_bn: bool
    # optimisation
    batch_size: int
    crop_size: int
    lr: float
    tot_iters: int
    epochs: Optional[int]
    stage1_iters: int
    # CoIC
    contra_loss_weight: float
    dim_in: int
    temperature: float
    n_neg: int
    # the backbone
    model_hparams: dict  # what the model is built with (stored in checkpoints)
    init_hparams: dict = field(default_factory=dict)  # passed at construction in training only
    backbone: dict = field(default_factory=dict)  # the recipe's own flags, by name
    demo: bool = False
    tiny: bool = False
    weights_dir: Optional[str] = None  # offline folder of published files (--pretrained NAME)
    trust_checkpoint: bool = False  # load checkpoints with the full (code-running) unpickler

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        values = vars(ns).copy()
        names = {f.name for f in dataclasses.fields(cls)}
        backbone = {k: values.pop(k) for k in list(values) if k not in names}
        return cls(**values, backbone=backbone)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        backbone = self.__dict__.get("backbone")
        if backbone is not None and name in backbone:
            return backbone[name]
        raise AttributeError(f"{type(self).__name__} has no field or backbone flag {name!r}")

    def flags(self) -> dict:
        """Every flag value, the backbone's included (what checkpoints store under ``args``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("recipe",
                                                                                                   "backbone")}
        return {**values, **self.backbone}
