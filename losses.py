"""Training losses: small modules, each with its formula in one line.

Two kinds: *criteria* compare two images (``criterion(x, y) -> loss``); *objectives* are what a
recipe trains, ``objective(model, rain, clean, z) -> (loss, output)``: they run the backbone
themselves, because some losses need more than its final image (RCDNet's and DGUNet's stages).
"""
from __future__ import annotations

import functools
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.metrics import gaussian_window


def full_precision(forward):
    """Run a criterion in float32 with autocast off (losses in bf16/fp16 lose the small differences)."""
    @functools.wraps(forward)
    def wrapped(self, *tensors: Tensor) -> Tensor:
        with torch.autocast(tensors[0].device.type, enabled=False):
            return forward(self, *(t.float() for t in tensors))
    return wrapped


class SSIMLoss(nn.Module):
    """-SSIM(x, y): 11x11 Gaussian (σ=1.5) with zero 'same' padding, mean over all pixels and channels."""

    def __init__(self, window: int = 11, sigma: float = 1.5):
        super().__init__()
        self.register_buffer("window", gaussian_window(window, sigma)[None, None], persistent=False)

    @full_precision
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        c = x.shape[1]
        w = self.window.to(x.dtype).expand(c, 1, -1, -1)
        pad = w.shape[-1] // 2

        def blur(t: Tensor) -> Tensor:
            return F.conv2d(t, w, padding=pad, groups=c)

        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x ** 2
        var_y = blur(y * y) - mu_y ** 2
        cov = blur(x * y) - mu_x * mu_y
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        return -ssim.mean()


class ContrastiveLoss(nn.Module):
    """InfoNCE: cross-entropy of logits (B,1+N) with the positive at index 0."""

    def forward(self, logits: Tensor) -> Tensor:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)


class L1Loss(nn.Module):
    """mean |x - y|."""

    @full_precision
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.l1_loss(x, y)


class CharbonnierLoss(nn.Module):
    """mean sqrt((x - y)² + ε²)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    @full_precision
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.sqrt((x - y) ** 2 + self.eps ** 2).mean()


class EdgeLoss(nn.Module):
    """Charbonnier(lap(x), lap(y)), lap = x - G(up(down(G(x)))) with G the 5-tap [.05 .25 .4 .25 .05] Gaussian."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        k = torch.tensor([0.05, 0.25, 0.4, 0.25, 0.05])
        self.register_buffer("kernel", torch.outer(k, k)[None, None], persistent=False)
        self.charbonnier = CharbonnierLoss(eps)

    def _gauss(self, img: Tensor) -> Tensor:
        c = img.shape[1]
        return F.conv2d(F.pad(img, (2, 2, 2, 2), mode="replicate"), self.kernel.to(img.dtype).expand(c, 1, 5, 5),
                        groups=c)

    def laplacian(self, img: Tensor) -> Tensor:
        blurred = self._gauss(img)
        upsampled = torch.zeros_like(blurred)
        upsampled[..., ::2, ::2] = blurred[..., ::2, ::2] * 4
        return img - self._gauss(upsampled)

    @full_precision
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.charbonnier(self.laplacian(x), self.laplacian(y))


class Objective(Protocol):
    """``objective(model, rain, clean, z) -> (loss, restored image)``; rain, clean (B,3,H,W) in [0,1]."""

    def __call__(self, model: nn.Module, rain: Tensor, clean: Tensor,
                 z: Optional[Tensor]) -> tuple[Tensor, Tensor]: ...


class ImageLoss(nn.Module):
    """Objective ``criterion(model(rain, z), clean)``: for backbones trained on their final image only."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, rain: Tensor, clean: Tensor, z: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        out = model(rain, z)
        return self.criterion(out, clean), out


class RCDNetStageLoss(nn.Module):
    """RCDNet's loss on the 0-255 scale with MSE:
    0.1·B0 + 0.1·Σ_s B_s + B_final + 0.1·Σ_s R_s + 0.9·R_last  (R targets: rainy - clean)."""

    def forward(self, model: nn.Module, rain: Tensor, clean: Tensor, z) -> tuple[Tensor, Tensor]:
        stages = model.forward_stages(rain, z)
        scale = model.value_scale
        clean_s, rain_layer = clean * scale, (rain - clean) * scale
        *stage_bs, final = stages.backgrounds
        loss = 0.1 * F.mse_loss(stages.b0, clean_s) + F.mse_loss(final, clean_s)
        loss = loss + 0.1 * sum(F.mse_loss(b, clean_s) for b in stage_bs)
        loss = loss + 0.1 * sum(F.mse_loss(r, rain_layer) for r in stages.rain_layers)
        loss = loss + 0.9 * F.mse_loss(stages.rain_layers[-1], rain_layer)
        return loss, final / scale


class StageSumLoss(nn.Module):
    """Σ over stage images of Charbonnier(out, clean) + edge_weight · Edge(out, clean) (DGUNet)."""

    def __init__(self, edge_weight: float = 0.05):
        super().__init__()
        self.charbonnier, self.edge, self.edge_weight = CharbonnierLoss(), EdgeLoss(), edge_weight

    def forward(self, model: nn.Module, rain: Tensor, clean: Tensor, z) -> tuple[Tensor, Tensor]:
        outs = model.forward_stages(rain, z)
        loss = sum(self.charbonnier(o, clean) + self.edge_weight * self.edge(o, clean) for o in outs)
        return loss, outs[0]
