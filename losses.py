"""Training losses: small modules, each with its formula in one line."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> Tensor:
    """Normalised 2-D Gaussian (size, size)."""
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


class SSIMLoss(nn.Module):
    """-SSIM(x, y): 11x11 Gaussian (σ=1.5) with zero 'same' padding, mean over all pixels and channels."""

    def __init__(self, window: int = 11, sigma: float = 1.5):
        super().__init__()
        self.register_buffer("window", gaussian_window(window, sigma)[None, None], persistent=False)

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

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.l1_loss(x, y)


class CharbonnierLoss(nn.Module):
    """mean sqrt((x - y)² + ε²)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.sqrt((x - y) ** 2 + self.eps ** 2).mean()
