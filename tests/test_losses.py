"""Loss formulas against numpy written from their definitions (DGUNet, MPRNet's edge loss)."""
import numpy as np
import pytest
import torch

from losses import CharbonnierLoss, ContrastiveLoss, EdgeLoss, L1Loss, StageSumLoss
from utils.train.recipes import RECIPES

EPS = 1e-3
TAPS = np.array([0.05, 0.25, 0.4, 0.25, 0.05])


def _np_gauss(img):
    """5x5 Gaussian of one channel (H,W), replicate padding, by explicit sums."""
    kernel = np.outer(TAPS, TAPS)
    padded = np.pad(img, 2, mode="edge")
    h, w = img.shape
    return np.array([[np.sum(padded[i:i + 5, j:j + 5] * kernel) for j in range(w)] for i in range(h)])


def _np_laplacian(img):
    blurred = _np_gauss(img)
    up = np.zeros_like(blurred)
    up[::2, ::2] = 4 * blurred[::2, ::2]
    return img - _np_gauss(up)


def _np_charbonnier(x, y):
    return np.mean(np.sqrt((x - y) ** 2 + EPS ** 2))


def _np_edge(x, y):
    """x, y: (C,H,W)."""
    lx = np.stack([_np_laplacian(c) for c in x])
    ly = np.stack([_np_laplacian(c) for c in y])
    return _np_charbonnier(lx, ly)


class _Stages(torch.nn.Module):
    """A stand-in backbone whose stage images are fixed."""

    def __init__(self, stages):
        super().__init__()
        self.stages = stages

    def forward_stages(self, x, z=None):
        return self.stages


def test_edge_and_charbonnier_against_numpy():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 2, 10, 9, generator=gen, dtype=torch.float64), torch.rand(1, 2, 10, 9, generator=gen,
                                                                                    dtype=torch.float64)
    assert float(CharbonnierLoss()(x, y)) == pytest.approx(_np_charbonnier(x[0].numpy(), y[0].numpy()), rel=1e-6)
    assert float(EdgeLoss()(x, y)) == pytest.approx(_np_edge(x[0].numpy(), y[0].numpy()), rel=1e-5)
    assert float(L1Loss()(x, y)) == pytest.approx(float(np.mean(np.abs(x.numpy() - y.numpy()))), rel=1e-6)


def test_dgunet_stage_sum_loss_formula():
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(1, 3, 8, 8, generator=gen)
    stages = [torch.rand(1, 3, 8, 8, generator=gen) for _ in range(3)]
    c = clean[0].double().numpy()
    # DGUNet's reference: Σ over all stage images of Charbonnier + 0.05 · edge
    expected = sum(_np_charbonnier(s[0].double().numpy(), c) + 0.05 * _np_edge(s[0].double().numpy(), c)
                   for s in stages)
    for loss_fn in (StageSumLoss(), RECIPES["DGUNet"].make_loss()):
        loss, out = loss_fn(_Stages(stages), torch.zeros_like(clean), clean, None)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert out is stages[0]  # the final image comes first in DGUNet's stage list


def test_contrastive_loss_is_cross_entropy_with_positive_first():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    by_hand = np.mean([np.log(np.exp(r).sum()) - r[0] for r in logits.numpy().astype(np.float64)])
    assert float(ContrastiveLoss()(logits)) == pytest.approx(by_hand, rel=1e-6)


def _np_ssim_same_zero_pad(x, y, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) with a Gaussian window and zero 'same' padding, per channel (C,H,W)."""
    from scipy.signal import convolve2d

    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    maps = []
    for a, b in zip(x, y):
        def blur(img):
            return convolve2d(img, window, mode="same", boundary="fill", fillvalue=0)
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
        maps.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(maps))


def test_ssim_loss_against_numpy():
    from losses import SSIMLoss

    gen = torch.Generator().manual_seed(2)
    # dark images of different brightness: the luminance term and its constant c1 matter
    x = 0.2 * torch.rand(1, 3, 20, 17, generator=gen)
    y = 0.5 * x + 0.05 * torch.rand(1, 3, 20, 17, generator=gen)
    expected = _np_ssim_same_zero_pad(x[0].double().numpy(), y[0].double().numpy())
    assert float(SSIMLoss()(x, y)) == pytest.approx(-expected, rel=1e-5)
