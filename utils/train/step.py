"""The training forward of one CoIC step, as one module (the one DDP wraps), and its objective.

The path from batch to loss: ``datasets.TrainItem`` (what the dataset yields) -> exemplars
(``utils.train.exemplars.build_negatives``) -> ``CoICStep``: momentum update, contrast (z and
logits), the recipe's base loss, which runs the backbone (``losses.Objective``), and the objective
``base + contra_loss_weight * InfoNCE``, written here and nowhere else.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor


class StepLosses(NamedTuple):
    """What one training forward returns (losses are 0-d tensors)."""
    total: Tensor  # what backward runs on: base, plus the weighted contrastive term in stage 2
    base: Tensor  # the recipe's restoration loss
    contra: Optional[Tensor]  # contra_loss_weight * InfoNCE (None in stage 1)
    out: Tensor  # the backbone's output
    logits: Optional[Tensor]  # the encoder's (B, 1+N) logits (None in stage 1)


class CoICStep(nn.Module):
    """One training forward (contrast + backbone + objective): the module DDP wraps.

    forward(rain, clean, query=None, positive=None, negatives=None) -> StepLosses.
    Without ``query`` (stage 1) no z is computed and the backbone runs unmodulated. ``loss`` is
    the recipe's base loss (``losses.Objective``: it runs the backbone itself); ``contrastive`` is
    InfoNCE on the logits, weighted by ``contra_weight``.
    """

    def __init__(self, model: nn.Module, encoder: nn.Module, loss: nn.Module, contrastive: nn.Module,
                 contra_weight: float):
        super().__init__()
        self.model, self.encoder, self.loss, self.contrastive = model, encoder, loss, contrastive
        self.contra_weight = contra_weight

    def forward(self, rain: Tensor, clean: Tensor, query: Optional[Tensor] = None,
                positive: Optional[Tensor] = None, negatives: Optional[Tensor] = None) -> StepLosses:
        logits = z = None
        if query is not None:
            self.encoder.momentum_update()  # MoCo: the key encoder follows the query encoder, before the keys
            logits, z = self.encoder.contrast(query, positive, negatives, update_keys=False)
        base, out = self.loss(self.model, rain, clean, z)
        if logits is None:
            return StepLosses(base, base, None, out, None)
        with torch.autocast(rain.device.type, enabled=False):  # the objective in float32, whatever the autocast
            contra = self.contrastive(logits.float()) * self.contra_weight
            return StepLosses(base + contra, base, contra, out, logits)
