"""Learning-rate schedules the recipes need beyond ``torch.optim.lr_scheduler``."""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler


class CyclicCosineRestart(LRScheduler):
    """Cosine annealing in consecutive cycles (Restormer/DRSformer's "restart cyclic" schedule).

    In cycle i (``periods[i]`` steps long, starting at step s_i):
        lr = eta_min_i + w_i · (base_lr - eta_min_i) · (1 + cos(π (t - s_i) / periods[i])) / 2
    Steps past the last cycle stay in the last cycle's formula, clamped at its end.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, periods: Sequence[int], eta_mins: Sequence[float],
                 restart_weights: Sequence[float] = (), last_epoch: int = -1):
        if not (len(periods) == len(eta_mins)) or (restart_weights and len(restart_weights) != len(periods)):
            raise ValueError("periods, eta_mins and restart_weights must have the same length")
        self.periods = list(periods)
        self.eta_mins = list(eta_mins)
        self.restart_weights = list(restart_weights) or [1.0] * len(periods)
        self.starts = [0]
        for p in self.periods[:-1]:
            self.starts.append(self.starts[-1] + p)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = max(0, self.last_epoch)
        i = max(0, bisect.bisect_right(self.starts, step) - 1)
        t = min(step - self.starts[i], self.periods[i])
        eta, w = self.eta_mins[i], self.restart_weights[i]
        cos = (1 + math.cos(math.pi * t / self.periods[i])) / 2
        return [eta + w * (base - eta) * cos for base in self.base_lrs]
