"""PSNR/SSIM exactly as the CoIC paper evaluates (its Python evaluation, after Restormer).

Both work on the Y channel ``Y = 16 + 0.256789 R + 0.504129 G + 0.097906 B`` computed on the
0-255 scale in float64 (not rounded). PSNR has data range 255. SSIM uses an 11x11 Gaussian
(σ=1.5) with 'valid' filtering, k1=0.01, k2=0.03, after average-pool downsampling by
``f = max(1, round(min(H, W) / 256))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses import gaussian_window

__all__ = ["rgb_to_y", "psnr", "ssim", "psnr_per_image", "ssim_per_image"]

_Y_WEIGHTS = (0.256789, 0.504129, 0.097906)


def _as_batch(t: Tensor) -> Tensor:
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"expected an RGB image (3,H,W) or batch (B,3,H,W), got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def rgb_to_y(img: Tensor) -> Tensor:
    """img (B,3,H,W) in [0,1] -> Y (B,1,H,W) on the 0-255 scale (16..235), float64."""
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=img.device).view(1, 3, 1, 1)
    return (img.to(torch.float64) * 255.0 * w).sum(1, keepdim=True) + 16.0


def psnr_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB on Y, data range 255."""
    x, y = rgb_to_y(_as_batch(restored)), rgb_to_y(_as_batch(target))
    mse = ((x - y) / 255.0).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse)


def ssim_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM on Y (data range 255, Gaussian 11/1.5, valid, downsampled by f)."""
    x, y = rgb_to_y(_as_batch(restored)) / 255.0, rgb_to_y(_as_batch(target)) / 255.0
    f = max(1, round(min(x.shape[-2:]) / 256))
    if f > 1:
        x, y = F.avg_pool2d(x, f), F.avg_pool2d(y, f)
    w = gaussian_window(11, 1.5, torch.float64).to(x.device)[None, None]
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x ** 2
    var_y = F.conv2d(y * y, w) - mu_y ** 2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    s = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return s.flatten(1).mean(1)


def psnr(restored: Tensor, target: Tensor) -> float:
    """Mean PSNR (dB) over the batch; tensors in [0,1], (3,H,W) or (B,3,H,W)."""
    return float(psnr_per_image(restored, target).mean())


def ssim(restored: Tensor, target: Tensor) -> float:
    """Mean SSIM over the batch; tensors in [0,1], (3,H,W) or (B,3,H,W)."""
    return float(ssim_per_image(restored, target).mean())
