"""The losses at the sizes where their padding and subsampling meet the border (losses.py): images
smaller than the SSIM window, odd sides for the edge loss's every-other-pixel upsampling.
References are NumPy/SciPy written from the docstrings' formulas."""
import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from losses import EdgeLoss, SSIMLoss


def _gauss11() -> np.ndarray:
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_same_zero_pad(x: np.ndarray, y: np.ndarray) -> float:
    w = _gauss11()

    def blur(t):
        return convolve2d(t, w, mode="same", boundary="fill", fillvalue=0)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


@pytest.mark.parametrize("h, w", [(11, 11), (10, 12), (5, 16), (1, 1)])  # at, under and far under the window
def test_ssim_loss_at_and_under_the_window_size(h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    x, y = torch.rand(1, 1, h, w, generator=g), torch.rand(1, 1, h, w, generator=g)
    expected = -_ssim_same_zero_pad(x[0, 0].double().numpy(), y[0, 0].double().numpy())
    assert float(SSIMLoss()(x, y)) == pytest.approx(expected, abs=1e-5)


def _laplacian(img: np.ndarray) -> np.ndarray:
    k = np.outer(*[np.array([0.05, 0.25, 0.4, 0.25, 0.05])] * 2)

    def gauss(t):
        return convolve2d(np.pad(t, 2, mode="edge"), k, mode="valid")

    blurred = gauss(img)
    up = np.zeros_like(blurred)
    up[::2, ::2] = blurred[::2, ::2] * 4
    return img - gauss(up)


@pytest.mark.parametrize("h, w", [(4, 4), (5, 5), (5, 6), (1, 3)])
def test_edge_loss_laplacian_on_even_and_odd_sides(h, w):
    x = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(h * 10 + w), dtype=torch.float64)
    np.testing.assert_allclose(EdgeLoss().laplacian(x)[0, 0].numpy(), _laplacian(x[0, 0].numpy()), atol=1e-6)  # float32 taps


def test_edge_loss_kernel_is_not_saved_with_a_state_dict():
    """The Gaussian kernel is rebuilt by the constructor: it stays out of state_dicts (and checkpoints)."""
    assert list(EdgeLoss().state_dict()) == [] and EdgeLoss().kernel.shape[:2] == (1, 1)
