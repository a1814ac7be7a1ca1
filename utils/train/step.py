"""The training forward of one CoIC step, as one module (the one DDP wraps).

The path from batch to loss: ``TrainItem`` (what the dataset yields) -> exemplars
(``utils.train.exemplars.build_negatives``) -> ``CoICStep``: momentum update, contrast (z and
logits), then the recipe's objective, which runs the backbone (``losses.Objective``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch.nn as nn
from torch import Tensor


class TrainItem(NamedTuple):
    """A training batch as the dataset yields it, each (B,3,crop,crop) in [0,1]."""
    rain: Tensor  # rainy crop
    clean: Tensor  # its clean partner (same crop, same flip)
    query: Tensor  # the whole rainy image resized: what the encoder sees
    query_clean: Tensor  # the whole clean image resized: the exemplars are built on it


class CoICStep(nn.Module):
    """One training forward (contrast + backbone + objective): the module DDP wraps.

    forward(rain, clean, query=None, positive=None, negatives=None) -> (base loss, output, logits).
    Without ``query`` (stage 1) no z is computed and the backbone runs unmodulated. The
    ``loss`` is the recipe's objective (``losses.Objective``): it runs the backbone itself.
    """

    def __init__(self, model: nn.Module, encoder: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.encoder, self.loss = model, encoder, loss

    def forward(self, rain: Tensor, clean: Tensor, query: Optional[Tensor] = None,
                positive: Optional[Tensor] = None, negatives: Optional[Tensor] = None):
        logits = z = None
        if query is not None:
            self.encoder.momentum_update()  # MoCo: the key encoder follows the query encoder, before the keys
            logits, z = self.encoder.contrast(query, positive, negatives, update_keys=False)
        base, out = self.loss(self.model, rain, clean, z)
        return base, out, logits
