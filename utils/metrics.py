"""PSNR/SSIM on the Y channel under the three evaluation protocols deraining papers use.

``coic`` (``psnr``/``ssim``): exactly the CoIC paper's Python evaluation (after Restormer).
Y = 16 + 0.256789 R + 0.504129 G + 0.097906 B on the 0-255 scale in float64 (not rounded),
from the float output. PSNR has data range 255. SSIM uses an 11x11 Gaussian (σ=1.5) with
'valid' filtering, k1=0.01, k2=0.03, after average-pool downsampling by
``f = max(1, round(min(H, W) / 256))``.

``matlab`` (``matlab_psnr``/``matlab_ssim``): Restormer's and DRSformer's
``evaluate_PSNR_SSIM.m`` (Rain200L/H, SPA). The output is quantised to uint8 as it is saved;
Y is MATLAB's ``rgb2ycbcr`` on uint8, rounded to uint8; PSNR = 20 log10(255 / RMSE); SSIM is
Zhou Wang's ``SSIM_index`` v1.0: 11x11 Gaussian σ=1.5, 'valid', K=(0.01, 0.03), L=255, no
downsampling.

``matlab-ddn`` (``ddn_psnr``/``ddn_ssim``): the DID/DDN ``statistic.m`` of DDN, BRN, PReNet,
RCDNet. Y is ``rgb2ycbcr(im2double(img))`` (double, not rounded, in [16/255, 235/255]) of the
uint8 images; PSNR with peak 1; SSIM on Y x 255 with Zhou Wang's ``ssim.m`` (2009): box
low-pass ``imfilter(ones(f)/f^2, 'symmetric', 'same')`` and subsampling ``(1:f:end)`` with the
same f, then the Gaussian SSIM above.

``PROTOCOLS`` maps each name to its pair of functions; ``score(restored, target, protocol)``
returns (psnr, ssim). All functions take (3,H,W) or (B,3,H,W) tensors in [0,1].

``niqe`` (no reference, lower is better) is MATLAB's ``niqe_release``; see ``utils.niqe``.
``METRICS`` names every metric a table can show, with the way it improves, so tables can
mark the better value. ``python -m utils.metrics niqe FOLDER`` scores a folder of images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.niqe import niqe

__all__ = ["rgb_to_y", "psnr", "ssim", "psnr_per_image", "ssim_per_image", "quantize_uint8", "matlab_y_uint8",
           "matlab_y_double", "matlab_psnr", "matlab_ssim", "ddn_psnr", "ddn_ssim", "matlab_box_downsample",
           "MetricProtocol", "PROTOCOLS", "score", "gaussian_window", "niqe", "Metric", "METRICS",
           "parse_metrics", "better_value"]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> Tensor:
    """Normalised 2-D Gaussian (size, size)."""
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


_Y_WEIGHTS = (0.256789, 0.504129, 0.097906)


def _check_batch(t: Tensor) -> Tensor:
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"expected an RGB image (3,H,W) or batch (B,3,H,W), got shape {tuple(t.shape)}")
    return t.detach()


def _as_batch(t: Tensor) -> Tensor:
    return _check_batch(t).to(torch.float64)


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


# --------------------------------------------------------------------------- MATLAB protocols
# MATLAB's rgb2ycbcr: origT row 1 = [65.481 128.553 24.966], offset 16; T is scaled by 1/255 for
# uint8 and double input, the offset by 1 (uint8) or 1/255 (double), and imlincomb sums
# T1 R + T2 G + T3 B + offset in double. We form and sum them in that order: 194 of the 2^24
# colours are exact ties in exact arithmetic (255,51,187 -> 125.5) and round by the last bit.
_MATLAB_T = tuple((1.0 / 255.0) * c for c in (65.481, 128.553, 24.966))


def quantize_uint8(img: Tensor) -> Tensor:
    """(B,3,H,W) in [0,1] -> the uint8 values 0..255 that ``save_image`` writes, as float64.

    Rounded in the input's own dtype, as ``save_image`` does, so the score is the score of
    the PNG on disk.
    """
    return img.detach().clamp(0, 1).mul(255).round().to(torch.float64)


def _matlab_y(values: Tensor, offset: float) -> Tensor:
    r, g, b = values[:, 0:1], values[:, 1:2], values[:, 2:3]
    return _MATLAB_T[0] * r + _MATLAB_T[1] * g + _MATLAB_T[2] * b + offset


def matlab_y_uint8(img: Tensor) -> Tensor:
    """rgb2ycbcr on the uint8 image, Y channel: (B,1,H,W) float64 of integers 16..235.

    imlincomb rounds half away from zero; Y is positive, so that is floor(Y + 0.5).
    """
    return torch.floor(_matlab_y(quantize_uint8(_check_batch(img)), 16.0) + 0.5).clamp_(0, 255)


def matlab_y_double(img: Tensor) -> Tensor:
    """rgb2ycbcr(im2double(uint8 image)), Y channel: (B,1,H,W) float64 in [16/255, 235/255]."""
    return _matlab_y(quantize_uint8(_check_batch(img)) / 255.0, 16.0 / 255.0)


# Output pixels of the SSIM map computed at once: the float64 11x11 filters run through im2col
# (121 values per pixel), ~1 KB per pixel in one go, 12 GB for a 12-megapixel pair.
SSIM_STRIP_PIXELS = 2 ** 18


def _ssim_valid(x: Tensor, y: Tensor, c1: float, c2: float) -> Tensor:
    """(B,) mean SSIM map of (B,1,H,W) images: 11x11 Gaussian σ=1.5, 'valid' filtering.

    The map is computed in strips of whole rows (each output pixel sees the same 11x11 inputs
    as in one pass), so a large image needs memory for a strip, not for the whole filter bank.
    """
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels after downsampling, got {tuple(x.shape[-2:])}")
    w = gaussian_window(11, 1.5, torch.float64).to(x.device)[None, None]
    rows = x.shape[-2] - 10
    step = max(1, SSIM_STRIP_PIXELS // x.shape[-1])
    strips = []
    for top in range(0, rows, step):
        xs, ys = x[..., top:top + step + 10, :], y[..., top:top + step + 10, :]
        mu_x, mu_y = F.conv2d(xs, w), F.conv2d(ys, w)
        var_x = F.conv2d(xs * xs, w) - mu_x ** 2
        var_y = F.conv2d(ys * ys, w) - mu_y ** 2
        cov = F.conv2d(xs * ys, w) - mu_x * mu_y
        strips.append(((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return torch.cat(strips, dim=-2).flatten(1).mean(1)


def _psnr_from(x: Tensor, y: Tensor, peak: float) -> Tensor:
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak ** 2 / mse)


def matlab_psnr_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR (dB) of the ``matlab`` protocol: uint8 Y, peak 255."""
    return _psnr_from(matlab_y_uint8(restored), matlab_y_uint8(target), 255.0)


def matlab_ssim_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM of the ``matlab`` protocol: uint8 Y, L=255, no downsampling."""
    return _ssim_valid(matlab_y_uint8(restored), matlab_y_uint8(target), (0.01 * 255) ** 2, (0.03 * 255) ** 2)


def matlab_box_downsample(x: Tensor, f: int) -> Tensor:
    """MATLAB ``imfilter(x, ones(f)/f^2, 'symmetric', 'same')`` then ``x(1:f:end, 1:f:end)``.

    x: (B,C,H,W) -> (B,C,ceil(H/f),ceil(W/f)). imfilter puts the kernel origin at
    floor((f+1)/2), so the window of output i covers input rows i-c .. i-c+f-1 with
    c = (f-1)//2, mirrored (edge repeated) outside the image.
    """
    if f <= 1:
        return x
    c = (f - 1) // 2
    h, w = x.shape[-2:]
    rows = torch.from_numpy(np.pad(np.arange(h), (c, f - 1 - c), mode="symmetric")).to(x.device)
    cols = torch.from_numpy(np.pad(np.arange(w), (c, f - 1 - c), mode="symmetric")).to(x.device)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    return F.avg_pool2d(padded, kernel_size=f, stride=f)


def ddn_psnr_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR (dB) of the ``matlab-ddn`` protocol: double Y in [0,1], peak 1."""
    return _psnr_from(matlab_y_double(restored), matlab_y_double(target), 1.0)


def ddn_ssim_per_image(restored: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM of the ``matlab-ddn`` protocol: Y x 255, MATLAB box downsampling by f, L=255."""
    x, y = matlab_y_double(restored) * 255.0, matlab_y_double(target) * 255.0
    f = max(1, int(math.floor(min(x.shape[-2:]) / 256 + 0.5)))  # MATLAB round: half away from zero
    x, y = matlab_box_downsample(x, f), matlab_box_downsample(y, f)
    return _ssim_valid(x, y, (0.01 * 255) ** 2, (0.03 * 255) ** 2)


def matlab_psnr(restored: Tensor, target: Tensor) -> float:
    """Mean ``matlab``-protocol PSNR over the batch."""
    return float(matlab_psnr_per_image(restored, target).mean())


def matlab_ssim(restored: Tensor, target: Tensor) -> float:
    """Mean ``matlab``-protocol SSIM over the batch."""
    return float(matlab_ssim_per_image(restored, target).mean())


def ddn_psnr(restored: Tensor, target: Tensor) -> float:
    """Mean ``matlab-ddn``-protocol PSNR over the batch."""
    return float(ddn_psnr_per_image(restored, target).mean())


def ddn_ssim(restored: Tensor, target: Tensor) -> float:
    """Mean ``matlab-ddn``-protocol SSIM over the batch."""
    return float(ddn_ssim_per_image(restored, target).mean())


@dataclass(frozen=True)
class MetricProtocol:
    """A named evaluation protocol: its PSNR and SSIM functions and where it comes from."""
    name: str
    psnr: Callable[[Tensor, Tensor], float]
    ssim: Callable[[Tensor, Tensor], float]
    description: str


PROTOCOLS: dict[str, MetricProtocol] = {
    "coic": MetricProtocol("coic", psnr, ssim, "CoIC's Python evaluation: float Y, PSNR 255, SSIM after avg-pool by f"),
    "matlab": MetricProtocol("matlab", matlab_psnr, matlab_ssim,
                             "Restormer/DRSformer evaluate_PSNR_SSIM.m: uint8 Y, PSNR 255, SSIM without downsampling"),
    "matlab-ddn": MetricProtocol("matlab-ddn", ddn_psnr, ddn_ssim,
                                 "DID/DDN statistic.m: double Y, PSNR peak 1, "
                                 "SSIM on Y*255 after box downsampling by f"),
}


def score(restored: Tensor, target: Tensor, protocol: str = "coic") -> tuple[float, float]:
    """(PSNR dB, SSIM) of restored vs target, (3,H,W) or (B,3,H,W) in [0,1], under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    return p.psnr(restored, target), p.ssim(restored, target)


@dataclass(frozen=True)
class Metric:
    """A score a result table can show: its label, which way is better, whether it needs the clean image."""
    name: str
    label: str
    higher_is_better: bool
    needs_reference: bool
    digits: int
    description: str


METRICS: dict[str, Metric] = {
    "psnr": Metric("psnr", "PSNR", True, True, 2, "PSNR on Y in dB (--metric_protocol)"),
    "ssim": Metric("ssim", "SSIM", True, True, 4, "SSIM on Y (--metric_protocol)"),
    "niqe": Metric("niqe", "NIQE", False, False, 3, "no-reference naturalness, MATLAB niqe_release (utils.niqe)"),
}


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"psnr,ssim,niqe"`` -> the metric names, checked against ``METRICS`` (ValueError lists them)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or repr(text)}; choose from: {', '.join(METRICS)}")
    return names


def better_value(metric: str, a: float, b: float) -> float:
    """The better of two values of ``metric`` (higher or lower, as ``METRICS`` says)."""
    return max(a, b) if METRICS[metric].higher_is_better else min(a, b)


if __name__ == "__main__":
    from utils.eval.metric_cli import main

    raise SystemExit(main())
