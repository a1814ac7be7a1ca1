"""Both sides of the size edges of the metrics (utils/metrics.py, utils/niqe.py) and the metric flags
tested through what reads them. References: scikit-image's SSIM (a Gaussian of σ 1.5 truncated to
11 taps, borders cropped = 'valid') and numpy's symmetric padding, never the functions under test."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

import utils.metrics as metrics
from utils.eval.results import format_markdown
from utils.metrics import (METRICS, better_value, ddn_ssim_per_image, matlab_box_downsample, matlab_ssim_per_image,
                           matlab_y_double, parse_metrics, rgb_to_y, ssim_per_image)
from utils.niqe import MIN_SIDE, NIQEUndefined, niqe


def _pair(h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _ref_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    return structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range)


def _coic_ref(a, b, f: int) -> float:
    x, y = rgb_to_y(a) / 255.0, rgb_to_y(b) / 255.0
    if f > 1:
        x, y = F.avg_pool2d(x, f), F.avg_pool2d(y, f)
    return _ref_ssim(x[0, 0].numpy(), y[0, 0].numpy(), 1.0)


@pytest.mark.parametrize("side, f", [(383, 1), (384, 2)])  # round(383 / 256) = 1, round(384 / 256) = round(1.5) = 2
def test_coic_ssim_downsamples_from_384_on(side, f):
    a, b = _pair(side, side + 5)
    assert float(ssim_per_image(a, b)) == pytest.approx(_coic_ref(a, b, f), abs=1e-9)
    assert float(ssim_per_image(a, b)) != pytest.approx(_coic_ref(a, b, 3 - f), abs=1e-4)


def _box_ref(x: np.ndarray, f: int) -> np.ndarray:
    c = (f - 1) // 2
    p = np.pad(x, ((c, f - 1 - c), (c, f - 1 - c)), mode="symmetric")
    h, w = p.shape[0] // f, p.shape[1] // f
    return p[:h * f, :w * f].reshape(h, f, w, f).mean((1, 3))


@pytest.mark.parametrize("f", [2, 3])
def test_matlab_box_downsample_against_numpy(f):
    x = torch.rand(1, 1, 7, 8, dtype=torch.float64)
    np.testing.assert_allclose(matlab_box_downsample(x, f)[0, 0].numpy(), _box_ref(x[0, 0].numpy(), f), atol=1e-12)


def test_matlab_box_downsample_by_one_is_the_input():
    x = torch.rand(1, 1, 7, 8, dtype=torch.float64)
    assert matlab_box_downsample(x, 1) is x


@pytest.mark.parametrize("side, f", [(639, 2), (640, 3)])  # MATLAB round(2.5) = 3, where Python's round gives 2
def test_ddn_ssim_downsample_factor_rounds_half_away_from_zero(side, f):
    a, b = _pair(side, side)
    x, y = (_box_ref(matlab_y_double(t)[0, 0].numpy() * 255.0, f) for t in (a, b))
    assert float(ddn_ssim_per_image(a, b)) == pytest.approx(_ref_ssim(x, y, 255.0), abs=1e-9)


@pytest.mark.parametrize("side, f", [(383, 1), (384, 2)])
def test_ddn_ssim_downsample_factor_lower_edge(side, f):
    a, b = _pair(side, side)
    x, y = (_box_ref(matlab_y_double(t)[0, 0].numpy() * 255.0, f) for t in (a, b))
    assert float(ddn_ssim_per_image(a, b)) == pytest.approx(_ref_ssim(x, y, 255.0), abs=1e-9)


@pytest.mark.parametrize("fn", [matlab_ssim_per_image, ddn_ssim_per_image])
def test_ssim_needs_11_pixels_on_each_side(fn):
    a, b = _pair(11, 11)
    assert 0 < float(fn(a, b)) < 1
    for h, w in ((10, 11), (11, 10)):
        a, b = _pair(h, w)
        with pytest.raises(ValueError, match="at least 11x11"):
            fn(a, b)


@pytest.mark.parametrize("rows, strip", [(17, 3), (16, 3), (17, 1)])  # rows of the map: 7, 6 (a multiple), 7
def test_ssim_in_strips_equals_one_pass(monkeypatch, rows, strip):
    a, b = _pair(rows, 23)
    whole = float(matlab_ssim_per_image(a, b))
    monkeypatch.setattr(metrics, "SSIM_STRIP_PIXELS", strip * 23 if strip > 1 else 22)  # 22 < a row: one row
    assert float(matlab_ssim_per_image(a, b)) == pytest.approx(whole, abs=1e-12)
    x, y = (metrics.matlab_y_uint8(t)[0, 0].numpy() for t in (a, b))
    assert whole == pytest.approx(_ref_ssim(x, y, 255.0), abs=1e-9)


# ------------------------------------------------------------------ NIQE sizes
def _texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_niqe_min_side_is_192_on_each_side():
    assert MIN_SIDE == 192
    assert np.isfinite(niqe(_texture(192, 192)))
    for h, w in ((191, 192), (192, 191)):
        with pytest.raises(NIQEUndefined, match="at least 192x192"):
            niqe(_texture(h, w))


def test_niqe_uses_whole_blocks_only():
    img = _texture(192, 288)
    assert niqe(img[:, :, :287]) == niqe(img[:, :, :192])  # 287 = 2 blocks of 96 and a remainder
    assert niqe(img) != niqe(img[:, :, :192])  # 288 = 3 blocks


@pytest.mark.parametrize("textured, defined", [(2, True), (1, False)])
def test_niqe_needs_two_textured_blocks(textured, defined):
    img = torch.full((3, 192, 192), 0.5, dtype=torch.float64)
    corners = [(0, 0), (96, 96)][:textured]
    for i, j in corners:  # texture 8 pixels inside the block: the filters reach no neighbour
        img[:, i + 8:i + 88, j + 8:j + 88] = _texture(80, 80, seed=i + 1)
    if defined:
        assert np.isfinite(niqe(img))
    else:
        with pytest.raises(NIQEUndefined, match="fewer than two"):
            niqe(img)


# ------------------------------------------------------------------ metric flags, through their readers
def test_parse_metrics_edges():
    assert parse_metrics("niqe") == ("niqe",)
    assert parse_metrics(" PSNR, psnr ,ssim,") == ("psnr", "ssim")
    for text in ("", " , ", "psnr,lpips"):
        with pytest.raises(ValueError, match="choose from"):
            parse_metrics(text)


@pytest.mark.parametrize("higher", [True, False])
def test_higher_is_better_decides_the_bold_niqe_cell(monkeypatch, higher):
    monkeypatch.setitem(METRICS, "niqe", dataclasses.replace(METRICS["niqe"], higher_is_better=higher))
    assert better_value("niqe", 4.0, 6.0) == (6.0 if higher else 4.0)
    row = {"dataset": "set", "images": 2, "niqe_rain": 6.0, "niqe_out": 4.0, "niqe_change": -2.0}
    line = format_markdown([row], "coic").splitlines()[-1]
    assert ("**6.000**" in line) == higher and ("**4.000**" in line) == (not higher)


def test_equal_niqe_values_are_not_marked():
    row = {"dataset": "set", "images": 1, "niqe_rain": 5.0, "niqe_out": 5.0, "niqe_change": 0.0}
    assert "**" not in format_markdown([row], "coic")


@pytest.mark.parametrize("digits", [2, 4])
def test_metric_digits_are_the_table_digits(monkeypatch, digits):
    monkeypatch.setitem(METRICS, "niqe", dataclasses.replace(METRICS["niqe"], digits=digits))
    row = {"dataset": "set", "images": 1, "niqe_rain": 5.123456, "niqe_out": 4.0, "niqe_change": -1.123456}
    line = format_markdown([row], "coic").splitlines()[-1]
    assert f"{5.123456:.{digits}f}" in line and f"{-1.123456:+.{digits}f}" in line


@pytest.mark.parametrize("needs", [False, True])
def test_needs_reference_decides_what_an_image_without_ground_truth_gets(monkeypatch, needs):
    from utils.eval.evaluation import _wanted

    assert _wanted(["psnr", "ssim", "niqe"], has_clean=True) == {"psnr", "ssim", "niqe"}
    monkeypatch.setitem(METRICS, "niqe", dataclasses.replace(METRICS["niqe"], needs_reference=needs))
    monkeypatch.setitem(METRICS, "psnr", dataclasses.replace(METRICS["psnr"], needs_reference=not needs))
    assert _wanted(["psnr", "ssim", "niqe"], has_clean=False) == ({"psnr"} if needs else {"niqe"})


def test_niqe_with_one_textured_block_says_how_many_are_flat():
    """One textured corner (48x48) in a flat 192x192 picture: 4 blocks of 96, 3 flat, one to fit: undefined
    (the edge is two), and the message counts the flat blocks."""
    img = torch.full((3, 192, 192), 0.5)
    img[:, :48, :48] = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NIQEUndefined, match="3 of 4 blocks are flat"):
        niqe(img)
