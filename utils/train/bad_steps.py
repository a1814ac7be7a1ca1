"""Skipped-step bookkeeping without host-device syncs in the step.

A step whose loss is non-finite, or whose output leaves the recipe's explosion threshold,
must not change the weights. The step only computes a *verdict* on the device
(:meth:`BadStepMonitor.verdict`) and folds it into device-side counts (:meth:`track`);
the host reads them every few iterations (:meth:`read`), which is the one sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from utils.train import distributed as dist_utils

GOOD, EXPLODED, NON_FINITE = 0, 1, 2  # verdict codes


@dataclass(frozen=True)
class StepReport:
    """What happened since the previous read."""
    non_finite: int
    exploded: int
    run: int  # skipped steps in a row at the moment of the read
    longest: int  # longest run of skipped steps since the previous read
    worst: float  # largest |output| of the exploded steps
    signal: Optional[int]  # a pending signal, agreed across ranks (None alone: the host sees its own)

    @property
    def skipped(self) -> int:
        return self.non_finite + self.exploded


class BadStepMonitor:
    """Device-side counts of skipped steps: [non-finite, exploded, current run, longest run, worst |out|]."""

    def __init__(self, device: torch.device, dist: dist_utils.DistInfo):
        self.device, self.dist = device, dist
        self._counts = torch.zeros(5, device=device)

    def verdict(self, total: Tensor, out: Tensor, explode_threshold: Optional[float]) -> tuple[Tensor, Tensor]:
        """(code, max |output|) on the device: ``GOOD``, ``EXPLODED`` or ``NON_FINITE``.

        Under DDP the ranks agree (max over ranks) so they skip, roll back and stop together.
        """
        code = (~torch.isfinite(total.detach())).float() * NON_FINITE
        if explode_threshold is None:  # no explosion check: no pass over the output
            peak = torch.zeros_like(code)
        else:
            peak = out.detach().abs().amax().float()
            code = torch.maximum(code, (~(peak <= explode_threshold)).float() * EXPLODED)
        if self.dist.enabled:
            code, peak = dist_utils.all_reduce_max(torch.stack([code, peak]), self.dist).unbind()
        return code, peak

    def track(self, code: Tensor, peak: Tensor) -> None:
        """Fold one step's verdict into the counts (device ops only)."""
        non_finite, exploded, run, longest, worst = self._counts.unbind()
        bad = (code > GOOD).float()
        run = (run + 1) * bad
        self._counts = torch.stack([non_finite + (code == NON_FINITE).float(), exploded + (code == EXPLODED).float(),
                                    run, torch.maximum(longest, run),
                                    torch.maximum(worst, torch.where(code == EXPLODED, peak, torch.zeros_like(peak)))])

    def read(self, pending_signal: Optional[int] = None) -> StepReport:
        """The host sync: the counts since the last read (the current run carries over)."""
        values = self._counts
        if self.dist.enabled:
            pending = torch.tensor([float(pending_signal or 0)], device=values.device)
            values = dist_utils.all_reduce_max(torch.cat([values, pending]), self.dist)
        values = values.tolist()
        non_finite, exploded, run, longest, worst = values[:5]
        signal = (int(values[5]) or None) if self.dist.enabled else pending_signal
        self._counts = torch.tensor([0.0, 0.0, run, run, 0.0], device=self.device)
        return StepReport(int(non_finite), int(exploded), int(run), int(longest), worst, signal)

    def reset(self) -> None:
        self._counts.zero_()
