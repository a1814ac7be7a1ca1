"""Positive and negative exemplars of the rain-/detail-aware contrastive loss.

Two constructions (``--exemplars``), for a batch of rainy queries (each image resized to crop x crop):

``query`` (``build_negatives``):
- positive key: the query, randomly flipped (same rain, same detail);
- rain-aware negative: the query's clean image plus the rain layer (rainy - clean) of the resized
  images that is most different (L1) among the recent rain layers kept in a ``RainArchive``, so
  it differs from the query in its rain alone;
- detail-aware negatives: ``n_neg`` copies of the clean image, Gaussian-blurred
  (kernel 11, σ ~ U[0.3, 1.5]) and randomly flipped (same background, less detail, no rain).
All randomness is drawn per sample.

``published`` (``build_negatives_published``), as the published train scripts build them:
- positive key and detail-aware negatives as above, but with one flip pair and one σ for the
  whole batch (torchvision transforms applied to a batch tensor);
- rain-aware negative: the training *crop's* clean patch plus the most different crop rain layer,
  searched in the current batch (BRN, IDT) or in the archive of the last 64 images (the others):
  the recipe's ``rain_pool``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def random_flips(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flip each image (N,C,H,W) horizontally and/or vertically with probability 1/2 each."""
    n = x.shape[0]
    h_flip, v_flip = (torch.rand(2, n, generator=generator, device=generator.device if generator else None)
                      .to(x.device) < 0.5).view(2, n, 1, 1, 1)
    x = torch.where(h_flip, x.flip(-1), x)
    return torch.where(v_flip, x.flip(-2), x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 11) -> Tensor:
    """Blur each image (N,C,H,W) with its own σ (N,), reflect padding (torchvision's GaussianBlur)."""
    n, c, h, w = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x)[:, None]) ** 2)
    k = k / k.sum(-1, keepdim=True)  # (N, K)
    k = k.repeat_interleave(c, 0)  # one separable kernel per (image, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


class RainArchive:
    """The rain layers (rainy - clean) of the last ``capacity`` batches, on the training device."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.layers: list[Tensor] = []

    @classmethod
    def for_batch_size(cls, batch_size: int, images: int = 64) -> "RainArchive":
        """Keep about ``images`` rain layers: the last ⌊images / batch_size⌋ batches."""
        return cls(images // max(1, batch_size))

    def push(self, rain_layers: Tensor) -> None:
        self.layers.append(rain_layers.detach())
        del self.layers[:-self.capacity]

    def most_different(self, rain_layers: Tensor) -> Tensor:
        """For each layer (B,C,H,W), the archived layer with the largest L1 distance to it."""
        bank = torch.cat(self.layers, 0)
        dist = torch.cdist(rain_layers.flatten(1), bank.flatten(1), p=1)  # (B, M)
        return bank[dist.argmax(dim=1)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "layers": [t.cpu() for t in self.layers]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.capacity = state["capacity"]
        self.layers = [t.to(device) for t in state["layers"]]


def build_negatives(query: Tensor, query_clean: Tensor, archive: RainArchive, n_neg: int,
                    generator: Optional[torch.Generator] = None,
                    gather: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Positive keys (B,3,h,w) and negatives (B,1+n_neg,3,h,w) for rainy ``query`` and its clean
    partner ``query_clean`` (the dataset's ``TrainItem`` fields of the same names).

    The current batch's rain layers are pushed into ``archive`` first, so the archive is
    never empty and the rain-aware negative never carries the query's own rain unless the
    whole archive holds only that. ``gather`` (distributed training) collects the rain layers
    of every rank before they enter the archive, so all ranks keep the same archive.
    """
    b = query.shape[0]
    rain_layers = query - query_clean
    archive.push(gather(rain_layers) if gather is not None else rain_layers)
    rain_negative = (query_clean + archive.most_different(rain_layers)).clamp(0.0, 1.0)
    copies = query_clean.unsqueeze(1).expand(b, n_neg, *query_clean.shape[1:]).flatten(0, 1)
    sigma = torch.empty(b * n_neg, device=generator.device if generator else None).uniform_(
        0.3, 1.5, generator=generator)
    detail_negatives = random_flips(gaussian_blur(copies, sigma), generator).view(b, n_neg, *query_clean.shape[1:])
    negatives = torch.cat([rain_negative.unsqueeze(1), detail_negatives], dim=1)
    return random_flips(query, generator), negatives


def _batch_flips(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One horizontal then one vertical flip decision (probability 1/2 each) for the whole batch.

    The decisions stay on the device (no host sync in the training step)."""
    h_flip, v_flip = (torch.rand(2, generator=generator, device=generator.device if generator else None)
                      .to(x.device) < 0.5)
    x = torch.where(h_flip, x.flip(-1), x)
    return torch.where(v_flip, x.flip(-2), x)


def build_negatives_published(rain: Tensor, clean: Tensor, query: Tensor, query_clean: Tensor,
                              archive: RainArchive, n_neg: int, generator: Optional[torch.Generator] = None,
                              gather: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Positive keys (B,3,h,w) and negatives (B,1+n_neg,3,h,w), built as the published scripts do.

    ``rain``/``clean``: the training crops; ``query``/``query_clean``: the whole images resized (the
    dataset's ``TrainItem``). Draws, in order: the positive's two flips, the blur σ, the detail
    negatives' two flips, one each for the batch. ``archive`` holds the pool of crop rain layers:
    capacity 1 is the published in-batch search (BRN, IDT). The crop and the resized query have
    the same size (``crop_size``), so the crop-based negative sits beside the resized query.
    """
    b = query.shape[0]
    positive = _batch_flips(query, generator)
    copies = query_clean.unsqueeze(1).expand(b, n_neg, *query_clean.shape[1:]).flatten(0, 1)
    sigma = torch.empty(1, device=generator.device if generator else None).uniform_(0.3, 1.5, generator=generator)
    detail_negatives = _batch_flips(gaussian_blur(copies, sigma.expand(b * n_neg)), generator)
    rain_layers = rain - clean
    archive.push(gather(rain_layers) if gather is not None else rain_layers)
    rain_negative = (clean + archive.most_different(rain_layers)).clamp(0.0, 1.0)
    negatives = torch.cat([rain_negative.unsqueeze(1), detail_negatives.view(b, n_neg, *query_clean.shape[1:])],
                          dim=1)
    return positive, negatives


def build_exemplars(mode: str, item, archive: RainArchive, n_neg: int, generator: Optional[torch.Generator] = None,
                    gather: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Positive keys and negatives of a batch (``datasets.TrainItem``) by ``--exemplars`` ``mode``."""
    if mode == "published":
        return build_negatives_published(item.rain, item.clean, item.query, item.query_clean, archive, n_neg,
                                         generator, gather)
    return build_negatives(item.query, item.query_clean, archive, n_neg, generator, gather)


def archive_for(mode: str, rain_pool: str, batch_size: int) -> RainArchive:
    """The rain-layer pool of a run: the published in-batch search (``rain_pool`` "batch", BRN and IDT) is an
    archive of the current batch alone; otherwise the last 64 images (``batch_size``: all ranks' batch)."""
    if mode == "published" and rain_pool == "batch":
        return RainArchive(1)
    return RainArchive.for_batch_size(batch_size)
