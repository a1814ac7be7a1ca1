"""Model registry: ``build_model(name, **hparams)`` and ``build_encoder(**hparams)``.

Every backbone follows one contract: ``model(x, z=None)`` maps x (B,3,H,W) in [0,1] to the
restored image (same shape, [0,1] domain, not clamped); ``z`` (B,dim_in) switches CoI-M on.
A backbone declares ``size_multiple`` (inputs are padded to it) and, when it only works at
its training resolution, ``tile_size`` (inputs are tiled at it). ``bf16_verified`` (default: none)
names the modes ("plain", "coic") whose bf16 output is shown as accurate as float32: there
``test_model.py`` runs bf16 by default on a CPU that computes it natively (``utils.speed``).
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from utils.errors import ModelConfigError

# name -> "module:Class"; modules are imported on first use so that one backbone's
# optional dependency never breaks another.
MODELS = {
    "BRN": "models.brn:BRN",
    "RCDNet": "models.rcdnet:RCDNet",
    "DGUNet": "models.dgunet:DGUNet",
    "IDT": "models.idt:IDT",
    "DRSformer": "models.drsformer:DRSformer",
}

__all__ = ["MODELS", "available_models", "build_model", "build_encoder", "model_class"]


def available_models() -> list[str]:
    return list(MODELS)


def model_class(name: str) -> type:
    if name not in MODELS:
        raise ModelConfigError(f"unknown --model_name {name!r}; choose one of: {', '.join(MODELS)}")
    module, cls = MODELS[name].split(":")
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
