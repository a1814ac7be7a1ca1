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

``BACKBONES`` is the only list of backbones: tests, benchmarks, tools and the table of published
weights iterate over it. A file that keeps per-backbone data of its own keys it by name and raises
``RegistryError`` (naming the backbone and the file to edit) for a backbone it has no entry for.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from utils.errors import ModelConfigError


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: what other code may know of it without importing its module."""

    name: str
    target: str  # "module:Class", imported on first use so that one backbone's optional dependency never breaks another
    # Names of the authors' released checkpoints of this backbone (``--test_model coic-brn``); their
    # files (paths, git blob ids) are download data and live in ``models.pretrained.PUBLISHED_MODELS``.
    published_weights: tuple[str, ...] = ()
    # "module:Class" of its counterpart in the authors' repository (github Schizophreni/CoIC), which
    # the benchmarks time side by side (``benchmarks/published.py``); None: the paper has none.
    published_code: Optional[str] = None


class RegistryError(Exception):
    """Per-backbone data that disagrees with ``BACKBONES`` (a bug): says which backbone and which file to edit."""


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("BRN", "models.brn:BRN", ("baseline-brn", "coic-brn"), "models.BRN_CoIM:BRN"),
    Backbone("RCDNet", "models.rcdnet:RCDNet", ("baseline-rcdnet", "coic-rcdnet"), "models.RCDNet_CoIM:RCDNet"),
    Backbone("DGUNet", "models.dgunet:DGUNet", published_code="models.DGUNet_CoIM:DGUNet"),
    Backbone("IDT", "models.idt:IDT", published_code="models.IDT_CoIM:IDT"),
    Backbone("DRSformer", "models.drsformer:DRSformer", published_code="models.DRSformer_CoIM:DRSformer"),
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

__all__ = ["Backbone", "BACKBONES", "MODELS", "RegistryError", "available_models", "backbone", "build_model",
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
