import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.metrics import psnr, psnr_per_image, rgb_to_y, ssim, ssim_per_image


def test_y_channel_coefficients():
    img = torch.zeros(1, 3, 1, 1)
    img[0, 0] = 1.0  # pure red
    assert float(rgb_to_y(img)) == pytest.approx(16 + 0.256789 * 255)
    assert float(rgb_to_y(torch.ones(1, 3, 1, 1))) == pytest.approx(16 + 255 * (0.256789 + 0.504129 + 0.097906))


def test_psnr_known_value():
    a = torch.full((3, 8, 8), 0.5, dtype=torch.float64)
    b = a + 10 / 255  # every channel +10 -> Y differs by 10 * (sum of weights)
    dy = 10 * (0.256789 + 0.504129 + 0.097906)
    assert psnr(b, a) == pytest.approx(10 * math.log10(255 ** 2 / dy ** 2), abs=1e-9)
    assert psnr(a, a) == math.inf


def test_psnr_batch_mean_and_shapes():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    per = psnr_per_image(x, y)
    assert psnr(x, y) == pytest.approx(float(per.mean()))
    assert psnr(x[0], y[0]) == pytest.approx(float(per[0]))
    with pytest.raises(ValueError, match=r"expected an RGB image .* got shape \(1, 1, 16, 16\)"):
        psnr(torch.rand(1, 16, 16), torch.rand(1, 16, 16))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((3, 60, 70))).float()
    y = (x + 0.1 * torch.from_numpy(rng.standard_normal((3, 60, 70))).float()).clamp(0, 1)
    ya, yb = rgb_to_y(x[None])[0, 0].numpy(), rgb_to_y(y[None])[0, 0].numpy()
    expected = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255.0)
    assert ssim(x, y) == pytest.approx(expected, abs=1e-9)
    assert ssim(x, x) == pytest.approx(1.0)


def test_ssim_downsamples_large_images():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 400, 520)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    # f = round(400 / 256) = 2: equal to SSIM of the 2x2-average-pooled Y images
    pooled = ssim_per_image(x, y)
    from utils import metrics

    yx, yy = F.avg_pool2d(rgb_to_y(x) / 255, 2), F.avg_pool2d(rgb_to_y(y) / 255, 2)
    w = metrics.gaussian_window(11, 1.5, torch.float64)[None, None]
    mx, my = F.conv2d(yx, w), F.conv2d(yy, w)
    vx, vy = F.conv2d(yx * yx, w) - mx ** 2, F.conv2d(yy * yy, w) - my ** 2
    cxy = F.conv2d(yx * yy, w) - mx * my
    s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))
    assert float(pooled) == pytest.approx(float(s.mean()), abs=1e-12)
