"""NIQE, the no-reference "naturalness" score, equal to the MATLAB release (lower is better).

Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer", IEEE SPL
2013; the reference is LIVE's ``niqe_release`` (``computequality.m``). What it computes:

1. the image on the 0-255 scale, rounded to integers as MATLAB's uint8 images are, reduced to
   one channel: ``"y"`` is the Y of MATLAB's ``rgb2ycbcr`` on uint8 (16 + (65.481 R + 128.553 G +
   24.966 B) / 255 in MATLAB's order of operations, rounded half up; BasicSR's default), ``"gray"`` the luminance
   0.299 R + 0.587 G + 0.114 B, rounded (pyiqa's default ``niqe``, which the published
   ``eval_niqe.py`` calls);
2. cropped to whole 96 x 96 blocks; at each of two scales (the second after MATLAB's
   antialiased bicubic ``imresize(im, 0.5)``) the MSCN coefficients (I - mu) / (sigma + 1)
   with the 7 x 7 Gaussian window (sigma 7/6, replicate borders), and per block (96, then 48
   pixels) 18 features: a GGD fit (shape, variance) of the coefficients and, for each of four
   neighbour products (circular shifts within the block), an AGGD fit (shape, mean, left and
   right variances); shapes come from the same 0.2:0.001:10 grid search as MATLAB;
3. a multivariate Gaussian of the blocks' 36 features (``nanmean``; ``nancov`` drops blocks
   with a NaN) and its distance to the pristine model: sqrt(d' pinv((C_p + C) / 2) d).

The pristine model (36 means, a 36 x 36 covariance and the 7 x 7 window) is the metric's
definition: ``niqe_pristine.npz`` beside this file holds MATLAB's ``modelparameters.mat``
values (``mu_prisparam``, ``cov_prisparam``) as BasicSR redistributes them
(``basicsr/metrics/niqe_pris_params.npz``, Apache-2.0). MATLAB R2021a scores BasicSR's
``baboon.png`` 5.72957338 on Y; this module gives the same to 1e-6.

Everything is vectorised over blocks (no Python loop over blocks), in float64.
"""
from __future__ import annotations

import functools
import os
import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import gamma as gamma_fn
from torch import Tensor

__all__ = ["NIQEUndefined", "niqe", "niqe_features", "matlab_resize_matrix", "luminance_0_255", "pristine_model", "BLOCK",
           "MIN_SIDE", "CHANNELS"]

BLOCK = 96  # block side at the first scale (niqe_release's recommended value)
MIN_SIDE = 2 * BLOCK  # at least two blocks per side, so the second scale has 2 x 2 blocks of 48
CHANNELS = ("y", "gray")
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))  # computefeature.m's circshift offsets (row, column)
_PRISTINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "niqe_pristine.npz")


class NIQEUndefined(ValueError):
    """The image has no NIQE: smaller than ``MIN_SIDE`` on a side, or too flat to fit the model."""


@functools.lru_cache(maxsize=None)
def pristine_model() -> tuple[Tensor, Tensor, Tensor]:
    """(mu (36,), cov (36, 36), window (7, 7)) of the pristine model, float64."""
    with np.load(_PRISTINE) as data:
        return tuple(torch.from_numpy(np.asarray(data[k], dtype=np.float64)).clone()
                     for k in ("mu", "cov", "window"))


@functools.lru_cache(maxsize=None)
def _shape_grid() -> dict[str, Tensor]:
    """MATLAB's ``gam = 0.2:0.001:10``, the ratio the AGGD fit searches and sqrt(G(1/a) / G(3/a))."""
    gam = 0.2 + 0.001 * np.arange(9801, dtype=np.float64)
    g1, g2, g3 = gamma_fn(1 / gam), gamma_fn(2 / gam), gamma_fn(3 / gam)
    table = {"gam": gam, "aggd": g2 ** 2 / (g1 * g3), "beta_factor": np.sqrt(g1 / g3)}
    return {k: torch.from_numpy(v) for k, v in table.items()}


def luminance_0_255(image: Tensor, channel: str = "y") -> Tensor:
    """(H, W) float64 integers in 0..255: the channel NIQE scores of ``image``.

    image: (3, H, W) RGB or (1, H, W) / (H, W) grey, float in [0, 1]. It is first rounded to
    8 bits (MATLAB's uint8, rounded in the input's dtype as ``save_image`` does); grey input is used as is, RGB reduced as ``channel`` says.
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown NIQE channel {channel!r}; choose one of: {', '.join(CHANNELS)}")
    x = image.detach().cpu()
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != 3):
        raise ValueError(f"NIQE expects an RGB (3,H,W) or grey (1,H,W)/(H,W) image, got shape {tuple(image.shape)}")
    # rounded in the input's own dtype, as save_image writes it: the score of the PNG on disk
    x = x.clamp(0, 1).mul(255).round().to(torch.float64)
    if x.dim() == 2:
        return x
    r, g, b = x.unbind(0)
    if channel == "y":  # rgb2ycbcr on uint8: imlincomb with T = origT / 255, rounded half away from zero
        t = [(1 / 255) * c for c in (65.481, 128.553, 24.966)]
        return torch.floor(t[0] * r + t[1] * g + t[2] * b + 16 + 0.5)
    return (0.299 * r + 0.587 * g + 0.114 * b).round()


def _cubic(x: Tensor) -> Tensor:
    a = x.abs()
    inner = (1.5 * a ** 3 - 2.5 * a ** 2 + 1) * (a <= 1)
    outer = (-0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2) * ((a > 1) & (a <= 2))
    return inner + outer


def matlab_resize_matrix(in_len: int, scale: float) -> Tensor:
    """(out, in) float64 matrix M with ``M @ signal`` = MATLAB's ``imresize`` (bicubic,
    antialiased when shrinking, symmetric borders) of a 1-D signal; out = ceil(in * scale)."""
    out_len = int(np.ceil(in_len * scale))
    kernel_width = 4.0 / scale if scale < 1 else 4.0
    u = torch.arange(1, out_len + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = int(np.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]  # 1-based source positions
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    w = w / w.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])  # MATLAB's symmetric padding
    src = mirror[(idx.long() - 1) % (2 * in_len)]
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, src, w)
    return matrix


def _gaussian_filter(planes: Tensor, window: Tensor) -> Tensor:
    """``imfilter(plane, window, 'replicate')`` of each plane (P, H, W), float64; the window is
    separable (an outer product of its row sums), so it runs as two 1-D passes."""
    g = window.sum(1)
    pad = len(g) // 2
    h, w = planes.shape[-2:]
    x = F.pad(planes[None], (pad,) * 4, mode="replicate")[0]
    rows = sum(g[k] * x[..., k:k + w] for k in range(len(g)))
    return sum(g[k] * rows[..., k:k + h, :] for k in range(len(g)))


def _mscn(img: Tensor, window: Tensor) -> Tensor:
    """MSCN coefficients (I - mu) / (sigma + 1) of img (H, W), as computequality.m.

    The local moments are rounded to single precision and sigma and the coefficients are
    computed in single, as MATLAB R2021a does: that reproduces its 5.72957338 on baboon.png
    to 2e-7, where a float64 computation gives 5.72996 (sigma = sqrt(E[I^2] - mu^2) cancels
    badly in flat regions, so the precision of this step shows in the score).
    """
    mu, second = _gaussian_filter(torch.stack([img, img * img]), window).float()
    sigma = (second - mu * mu).abs().sqrt()
    return ((img.float() - mu) / (sigma + 1)).double()


def _nan_mean(x: Tensor, dim: int) -> Tensor:
    """Mean over the entries that exist along ``dim`` (``x`` NaN where absent); NaN when none."""
    valid = ~torch.isnan(x)
    return torch.where(valid, x, 0).sum(dim) / valid.sum(dim)


def _aggd(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row AGGD fit of values (N, n) as estimateaggdparam.m: (shape, beta_left, beta_right)."""
    grid = _shape_grid()
    left = _nan_mean(torch.where(values < 0, values * values, torch.nan), 1).sqrt()
    right = _nan_mean(torch.where(values > 0, values * values, torch.nan), 1).sqrt()
    ratio = left / right
    r_hat = values.abs().mean(1) ** 2 / values.pow(2).mean(1)
    r_norm = r_hat * (ratio ** 3 + 1) * (ratio + 1) / (ratio ** 2 + 1) ** 2
    k = (grid["aggd"][None] - r_norm[:, None]).pow(2).argmin(1)  # first minimum, as MATLAB's min
    return grid["gam"][k], left * grid["beta_factor"][k], right * grid["beta_factor"][k]


def _block_features(blocks: Tensor) -> Tensor:
    """(N, 18) NIQE features of N square blocks (N, b, b) of MSCN coefficients (computefeature.m)."""
    shape, beta_l, beta_r = _aggd(blocks.flatten(1))
    features = [shape, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        shape, beta_l, beta_r = _aggd((blocks * torch.roll(blocks, shifts=shift, dims=(1, 2))).flatten(1))
        mean = (beta_r - beta_l) * torch.exp(torch.lgamma(2 / shape) - torch.lgamma(1 / shape))
        features += [shape, mean, beta_l, beta_r]
    return torch.stack(features, 1)


def _blocks(x: Tensor, size: int) -> Tensor:
    """(H, W) with H, W multiples of ``size`` -> (N, size, size) non-overlapping blocks."""
    h, w = x.shape
    return x.reshape(h // size, size, w // size, size).permute(0, 2, 1, 3).reshape(-1, size, size)


def niqe_features(lum: Tensor) -> Tensor:
    """(N blocks, 36) features of a 0-255 luminance image (H, W), H, W >= ``MIN_SIDE``."""
    h, w = lum.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise NIQEUndefined(f"NIQE needs at least {MIN_SIDE}x{MIN_SIDE} pixels (2 x 2 blocks of {BLOCK}, "
                         f"{BLOCK // 2} at the second scale), got {h}x{w}")
    img = lum[: h // BLOCK * BLOCK, : w // BLOCK * BLOCK].to(torch.float64)
    window = pristine_model()[2]
    per_scale = []
    for scale in (1, 2):
        per_scale.append(_block_features(_blocks(_mscn(img, window), BLOCK // scale)))
        if scale == 1:
            img = matlab_resize_matrix(img.shape[0], 0.5) @ img @ matlab_resize_matrix(img.shape[1], 0.5).T
    return torch.cat(per_scale, 1)


def niqe(image: Tensor, channel: str = "y") -> float:
    """NIQE of ``image`` (3,H,W) RGB or (1,H,W)/(H,W) grey, float in [0,1]; lower is better.

    ``channel``: "y" (MATLAB ``rgb2ycbcr`` Y, the MATLAB-release convention) or "gray"
    (0.299 R + 0.587 G + 0.114 B, pyiqa's default). Both sides must be >= ``MIN_SIDE`` pixels and
    at least two blocks must have texture; otherwise ``NIQEUndefined`` (a ValueError) says why.
    """
    features = niqe_features(luminance_0_255(image, channel))
    mu_p, cov_p, _ = pristine_model()
    mu = _nan_mean(features, 0)
    complete = features[~torch.isnan(features).any(1)]
    if len(complete) < 2:  # flat blocks have no coefficient distribution to fit
        raise NIQEUndefined(f"NIQE is undefined: {len(features) - len(complete)} of {len(features)} blocks are flat "
                            "(no texture), fewer than two remain to fit the model")
    cov = torch.cov(complete.T)
    d = mu_p - mu
    quality = d @ torch.linalg.pinv((cov_p + cov) / 2) @ d
    return float(quality.sqrt())

