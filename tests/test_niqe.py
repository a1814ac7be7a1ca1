"""NIQE (utils.niqe) against an independent loop implementation written here from the MATLAB
release's formulas, against BasicSR's NumPy NIQE on scikit-image's images, and its properties."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import skimage.data
import torch
from scipy.ndimage import correlate

from utils.data.demo import add_rain
from utils.images import read_image, save_image
from utils.metrics import METRICS, better_value, parse_metrics
from utils.niqe import MIN_SIDE, matlab_resize_matrix, niqe, pristine_model


def _rgb(name: str) -> torch.Tensor:
    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------- a loop reference
def _ref_luminance(rgb: np.ndarray, channel: str) -> np.ndarray:
    r, g, b = np.round(np.clip(rgb, 0, 1) * np.float32(255)).astype(np.float64)
    if channel == "y":  # MATLAB rgb2ycbcr on uint8: T = origT / 255, imlincomb rounds half away from zero
        return np.floor((65.481 / 255) * r + (128.553 / 255) * g + (24.966 / 255) * b + 16 + 0.5)
    return np.round(0.299 * r + 0.587 * g + 0.114 * b)


def _ref_fspecial(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    half = (size - 1) / 2
    w = np.array([[math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma ** 2)) for j in range(size)]
                  for i in range(size)])
    return w / w.sum()


def _ref_imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB imresize(img, 0.5) (bicubic, antialiased), one output index at a time."""
    def cubic(x):
        a = abs(x)
        if a <= 1:
            return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
        if a <= 2:
            return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
        return 0.0

    def along_first_axis(x):
        n = x.shape[0]
        out = np.zeros((math.ceil(n / 2),) + x.shape[1:])
        for i in range(out.shape[0]):
            u = (i + 1) / 0.5 + 0.5 * (1 - 1 / 0.5)
            left = math.floor(u - 4)  # kernel width 4 / 0.5 = 8
            taps = list(range(left, left + 10))
            weights = np.array([0.5 * cubic(0.5 * (u - t)) for t in taps])
            weights /= weights.sum()
            for t, wt in zip(taps, weights):
                k = t - 1
                while k < 0 or k >= n:  # symmetric padding (the edge pixel repeated)
                    k = -k - 1 if k < 0 else 2 * n - k - 1
                out[i] += wt * x[k]
        return out

    return along_first_axis(along_first_axis(img).T).T


def _ref_aggd(v: np.ndarray, gam: np.ndarray, r_gam: np.ndarray):
    left = math.sqrt(np.mean(v[v < 0] ** 2))
    right = math.sqrt(np.mean(v[v > 0] ** 2))
    g = left / right
    r_hat = np.mean(np.abs(v)) ** 2 / np.mean(v ** 2)
    r_norm = r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    alpha = gam[int(np.argmin((r_gam - r_norm) ** 2))]
    scale = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left * scale, right * scale


def _ref_niqe(lum: np.ndarray) -> float:
    gam = np.array([0.2 + 0.001 * k for k in range(9801)])
    r_gam = np.array([math.gamma(2 / a) ** 2 / (math.gamma(1 / a) * math.gamma(3 / a)) for a in gam])
    window = _ref_fspecial()
    h, w = (lum.shape[0] // 96) * 96, (lum.shape[1] // 96) * 96
    img = lum[:h, :w]
    feats = {}
    for scale in (1, 2):
        # local moments rounded to single precision, as MATLAB R2021a (see utils.niqe._mscn)
        mu = correlate(img, window, mode="nearest").astype(np.float32)
        second = correlate(img * img, window, mode="nearest").astype(np.float32)
        sigma = np.sqrt(np.abs(second - mu * mu))
        mscn = ((img.astype(np.float32) - mu) / (sigma + 1)).astype(np.float64)
        b = 96 // scale
        for bi in range(h // 96):
            for bj in range(w // 96):
                block = mscn[bi * b:(bi + 1) * b, bj * b:(bj + 1) * b]
                alpha, bl, br = _ref_aggd(block.ravel(), gam, r_gam)
                f = [alpha, (bl + br) / 2]
                for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
                    pair = (block * np.roll(block, shift, axis=(0, 1))).ravel()
                    alpha, bl, br = _ref_aggd(pair, gam, r_gam)
                    f += [alpha, (br - bl) * math.gamma(2 / alpha) / math.gamma(1 / alpha), bl, br]
                feats.setdefault((bi, bj), []).extend(f)
        img = _ref_imresize_half(img)
    x = np.array(list(feats.values()))
    mu_p, cov_p, _ = (t.numpy() for t in pristine_model())
    d = mu_p - x.mean(0)
    return float(math.sqrt(d @ np.linalg.pinv((cov_p + np.cov(x, rowvar=False)) / 2) @ d))


def test_window_is_matlab_fspecial():
    assert np.abs(pristine_model()[2].numpy() - _ref_fspecial()).max() < 1e-15


def test_resize_matrix_equals_a_loop_over_output_pixels():
    x = np.random.default_rng(0).uniform(0, 255, (37, 50))
    ours = matlab_resize_matrix(37, 0.5).numpy() @ x @ matlab_resize_matrix(50, 0.5).numpy().T
    assert ours.shape == (19, 25)
    np.testing.assert_allclose(ours, _ref_imresize_half(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("channel", ["y", "gray"])
def test_niqe_equals_the_loop_reference(channel):
    rgb = _rgb("coffee")[:, 37:237, 101:402]  # 200 x 301: crops to 2 x 3 blocks
    expected = _ref_niqe(_ref_luminance(rgb.numpy(), channel))
    assert niqe(rgb, channel) == pytest.approx(expected, abs=1e-6)


# BasicSR's calculate_niqe (NumPy, float32 image; the MATLAB-R2021a-checked implementation the
# issue names), computed once on these images: (name, channel, value).
BASICSR = [("astronaut", "y", 3.0649476661847754), ("astronaut", "gray", 3.0610040667996845),
           ("chelsea", "y", 2.6255243812915023), ("coffee", "y", 4.115241615372862),
           ("coffee", "gray", 4.0593383127379035), ("rocket", "y", 6.969154974981048)]


@pytest.mark.parametrize("name,channel,value", BASICSR)
def test_niqe_matches_basicsr_on_scikit_image_images(name, channel, value):
    assert niqe(_rgb(name), channel) == pytest.approx(value, abs=1e-3)


def test_grey_input_is_scored_as_is():
    camera = torch.from_numpy(skimage.data.camera()).float() / 255
    assert niqe(camera) == pytest.approx(3.096206619345783, abs=1e-3)  # BasicSR, grey input
    assert niqe(camera[None]) == niqe(camera)
    assert niqe(camera.expand(3, -1, -1), "gray") == niqe(camera)  # R = G = B: luminance = the grey value


def test_streaks_raise_niqe():
    for name in ("astronaut", "chelsea"):
        clean = _rgb(name)[:, :288, :288]
        rainy = add_rain(clean.permute(1, 2, 0).double().numpy(), "heavy", np.random.default_rng(0))
        assert niqe(torch.from_numpy(rainy).permute(2, 0, 1).float()) > niqe(clean) + 1.0


def test_eight_bit_round_trip_and_odd_sizes(tmp_path):
    x = torch.rand(3, 250, 291, generator=torch.Generator().manual_seed(1)) * 0.5 + _rgb("astronaut")[:, :250, :291] * 0.5
    save_image(x, str(tmp_path / "x.png"))
    assert niqe(read_image(str(tmp_path / "x.png"))) == niqe(x)  # x is rounded to 8 bits first
    assert niqe(x) == niqe(x[:, :192, :288])  # only whole 96 x 96 blocks count


def test_too_small_images_are_refused_clearly():
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE}x{MIN_SIDE}"):
        niqe(torch.rand(3, MIN_SIDE - 1, 500))
    with pytest.raises(ValueError, match="channel"):
        niqe(torch.rand(3, 200, 200), "luma")
    with pytest.raises(ValueError, match="RGB"):
        niqe(torch.rand(4, 200, 200))


def test_metric_registry_directions():
    assert METRICS["psnr"].higher_is_better and not METRICS["niqe"].higher_is_better
    assert not METRICS["niqe"].needs_reference and METRICS["ssim"].needs_reference
    assert better_value("niqe", 4.0, 6.5) == 4.0 and better_value("psnr", 30.0, 31.5) == 31.5
    assert parse_metrics(" PSNR,niqe,psnr") == ("psnr", "niqe")
    with pytest.raises(ValueError, match="choose from"):
        parse_metrics("psnr,lpips")


def test_folder_command_writes_a_csv(tmp_path, capsys):
    from utils.eval.metric_cli import main

    images = {"a.png": _rgb("chelsea")[:, :200, :300], "b.png": _rgb("coffee")[:, :256, :256],
              "small.png": torch.rand(3, 100, 100)}
    for name, img in images.items():
        save_image(img, str(tmp_path / name))
    assert main(["niqe", str(tmp_path), "--no_progress"]) == 0
    with open(tmp_path / "niqe_y.csv") as f:
        rows = {r["name"]: r["niqe"] for r in csv.DictReader(f)}
    assert rows["small.png"] == ""
    for name in ("a.png", "b.png"):
        assert float(rows[name]) == pytest.approx(_ref_niqe(_ref_luminance(images[name].numpy(), "y")), abs=1e-4)
    mean = (float(rows["a.png"]) + float(rows["b.png"])) / 2
    printed = float(capsys.readouterr().out.split("mean ")[1].split()[0])
    assert printed == pytest.approx(mean, abs=2e-4)
    assert main(["niqe", str(tmp_path / "missing")]) == 2


def test_y_is_the_matlab_protocols_rgb2ycbcr_including_ties():
    from utils.metrics import matlab_y_uint8
    from utils.niqe import luminance_0_255

    v = torch.arange(0, 256, 5, dtype=torch.float32)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, 1, -1) / 255
    rgb = torch.cat([rgb, torch.tensor([255, 51, 187.]).view(3, 1, 1) / 255], -1)  # a tie (125.5 in exact arithmetic)
    assert torch.equal(luminance_0_255(rgb, "y"), matlab_y_uint8(rgb)[0, 0])
