"""Metric protocols (coic, matlab, matlab-ddn) and the multi-dataset evaluation table."""
import csv
import math
import os

import numpy as np
import pytest
import torch
from test_real_datasets import build_real_tree

import test_model
from datasets import dataset_spec, find_pairs, read_image, read_pair, save_image
from models import build_encoder, build_model
from utils import metrics
from utils.eval import evaluation
from utils.metrics import (
    PROTOCOLS,
    ddn_psnr,
    ddn_ssim,
    matlab_box_downsample,
    matlab_psnr,
    matlab_ssim,
    matlab_y_double,
    matlab_y_uint8,
    score,
)

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _uint8_image(rng, h, w) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, 256, (3, h, w))).float() / 255


def _y8_numpy(img: torch.Tensor) -> np.ndarray:
    """MATLAB rgb2ycbcr Y of the uint8 image, in numpy: round(T1 R + T2 G + T3 B + 16), T = (1/255) origT.

    Written in MATLAB's order of operations: 194 of the 2^24 colours are exact ties (e.g. 255,51,187
    -> 125.5), where the textbook 16 + (65.481 R + ...)/255 rounds the other way.
    """
    v = np.round(img.numpy().clip(0, 1) * np.float32(255)).astype(np.float64)  # uint8 as save_image writes it
    t = [(1 / 255) * c for c in (65.481, 128.553, 24.966)]
    return np.floor(t[0] * v[0] + t[1] * v[1] + t[2] * v[2] + 16 + 0.5)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    # Gaussian σ=1.5 (11 taps at skimage's truncate=3.5), population covariance, border of 5 cropped = 'valid'
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)


def test_matlab_y_is_rounded_rgb2ycbcr():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [100, 150, 200]],
                           dtype=torch.float32) / 255
    img = colours.t().reshape(3, 1, 6)
    # hand values: 16 + 65.481 = 81.481 -> 81; 16 + 128.553 -> 145; 16 + 24.966 -> 41; 16 + 219 = 235; 16;
    # 16 + (6548.1 + 19282.95 + 4993.2) / 255 = 136.879 -> 137
    assert matlab_y_uint8(img).flatten().tolist() == [81, 145, 41, 235, 16, 137]
    assert matlab_y_double(img).flatten().tolist() == pytest.approx(
        [81.481 / 255, 144.553 / 255, 40.966 / 255, 235 / 255, 16 / 255, 136.87941176470588 / 255], abs=1e-12)


def test_matlab_protocol_hand_computed_values():
    a = torch.zeros(3, 20, 30)
    a[0], a[1], a[2] = 100 / 255, 150 / 255, 200 / 255
    b = a.clone()
    b[0] = 110 / 255  # Y: 136.879 -> 137 vs 139.447 -> 139
    assert matlab_psnr(b, a) == pytest.approx(20 * math.log10(255 / 2), abs=1e-12)
    # constant images: no variance, SSIM = luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    assert matlab_ssim(b, a) == pytest.approx((2 * 137 * 139 + C1) / (137 ** 2 + 139 ** 2 + C1), abs=1e-12)
    # matlab-ddn: Y unrounded in [0,1], PSNR with peak 1
    dy = (1 / 255) * 65.481 * (10 / 255)
    assert ddn_psnr(b, a) == pytest.approx(20 * math.log10(1 / dy), abs=1e-9)
    ya, yb = 255 * (136.87941176470588 / 255), 255 * (136.87941176470588 / 255 + dy)
    assert ddn_ssim(b, a) == pytest.approx((2 * ya * yb + C1) / (ya ** 2 + yb ** 2 + C1), abs=1e-12)
    assert matlab_psnr(a, a) == math.inf


@pytest.mark.parametrize("size", [(40, 50), (390, 400)])
def test_matlab_ssim_matches_scikit_image_without_downsampling(size):
    rng = np.random.default_rng(1)
    x = _uint8_image(rng, *size)
    y = (x + 0.08 * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    expected = _skimage_ssim(_y8_numpy(x), _y8_numpy(y))
    assert matlab_ssim(x, y) == pytest.approx(expected, abs=1e-10)
    mse = np.mean((_y8_numpy(x) - _y8_numpy(y)) ** 2)
    assert matlab_psnr(x, y) == pytest.approx(20 * math.log10(255 / math.sqrt(mse)), abs=1e-10)
    if size[0] > 384:  # the coic protocol downsamples (f = 2) and uses unrounded Y: it must differ
        assert abs(score(x, y, "coic")[1] - matlab_ssim(x, y)) > 1e-3


def test_matlab_scores_the_saved_png(tmp_path):
    rng = np.random.default_rng(2)
    target = _uint8_image(rng, 30, 40)
    restored = (target + 0.03 * torch.from_numpy(rng.standard_normal(target.shape)).float()).clamp(0, 1)
    save_image(restored, str(tmp_path / "out.png"))
    on_disk = read_image(str(tmp_path / "out.png"))
    for protocol in ("matlab", "matlab-ddn"):
        assert score(restored, target, protocol) == score(on_disk, target, protocol)
    assert score(restored, target, "coic") != score(on_disk, target, "coic")  # coic scores the float output


def _box_reference(img: np.ndarray, f: int) -> np.ndarray:
    """imfilter(img, ones(f)/f^2, 'symmetric', 'same') as a sum of shifted copies, then img(1:f:end, 1:f:end)."""
    c = (f + 1) // 2 - 1  # MATLAB's kernel origin floor((f+1)/2), 0-based
    padded = np.pad(img, ((c, f - 1 - c), (c, f - 1 - c)), mode="symmetric")
    h, w = img.shape
    same = sum(padded[di:di + h, dj:dj + w] for di in range(f) for dj in range(f)) / f ** 2
    return same[::f, ::f]


@pytest.mark.parametrize("f", [2, 3, 4])
def test_matlab_box_downsampling_matches_explicit_loops(f):
    img = np.random.default_rng(f).random((13, 17))
    ours = matlab_box_downsample(torch.from_numpy(img)[None, None], f)[0, 0].numpy()
    ref = _box_reference(img, f)
    assert ours.shape == ref.shape == (math.ceil(13 / f), math.ceil(17 / f))
    np.testing.assert_allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("size,f", [((391, 410), 2), ((640, 650), 3)])  # 640/256 = 2.5: MATLAB rounds up
def test_ddn_ssim_matches_scikit_image_after_matlab_downsampling(size, f):
    rng = np.random.default_rng(3)
    x = _uint8_image(rng, *size)
    y = (x + 0.05 * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    ya, yb = (matlab_y_double(t)[0, 0].numpy() * 255 for t in (x, y))
    expected = _skimage_ssim(_box_reference(ya, f), _box_reference(yb, f))
    assert ddn_ssim(x, y) == pytest.approx(expected, abs=1e-10)
    # the downsampling matters: without it, or with plain average pooling, SSIM differs
    assert abs(_skimage_ssim(ya, yb) - expected) > 1e-5
    pooled = [torch.nn.functional.avg_pool2d(torch.from_numpy(t)[None, None], f)[0, 0].numpy() for t in (ya, yb)]
    assert abs(_skimage_ssim(*pooled) - expected) > 1e-7


def test_protocol_registry_and_errors():
    assert list(PROTOCOLS) == ["coic", "matlab", "matlab-ddn"]
    x = torch.rand(3, 16, 16)
    assert score(x, x, "coic") == (math.inf, pytest.approx(1.0))
    with pytest.raises(ValueError, match="unknown metric protocol"):
        score(x, x, "matlab2")
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.matlab_ssim(torch.rand(3, 8, 30), torch.rand(3, 8, 30))


# --------------------------------------------------------------------------- evaluation table
ALL_SETS = "Rain200L,Rain200H,Rain800,DID,DDN,SPA,RealInt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    root = str(base / "datasets")
    build_real_tree(root)
    torch.manual_seed(0)
    model, encoder = build_model("BRN", inter_iter=1), build_encoder()
    ckpt = str(base / "tiny.pth")
    torch.save({"model_name": "BRN", "model_hparams": {"inter_iter": 1}, "model": model.state_dict(),
                "encoder": encoder.state_dict(), "encoder_hparams": {"dim": 128}}, ckpt)
    return root, ckpt


def _run(ckpt, root, out, *extra):
    return test_model.main(["--test_model", ckpt, "--model_name", "BRN", "--testset", ALL_SETS,
                            "--data_root", root, "--save_path", out, *extra])


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("protocol", ["coic", "matlab", "matlab-ddn"])
def test_multi_dataset_table_for_each_protocol(setup, tmp_path, protocol, capsys):
    root, ckpt = setup
    out = str(tmp_path / "out")
    mode = "tran" if protocol == "coic" else "normal"
    assert _run(ckpt, root, out, "--metric_protocol", protocol, "--load_mode", mode) == 0
    printed = capsys.readouterr().out
    summary = _csv(os.path.join(out, "summary.csv"))
    assert [r["dataset"] for r in summary] == ALL_SETS.split(",") + ["Mean"]
    assert {r["protocol"] for r in summary} == {protocol}
    counts = {r["dataset"]: int(r["images"]) for r in summary}
    assert counts == {"Rain200L": 2, "Rain200H": 2, "Rain800": 2, "DID": 2, "DDN": 14, "SPA": 2, "RealInt": 2,
                      "Mean": 24}
    realint = summary[6]
    assert realint["psnr"] == "" and realint["ssim"] == ""  # derained without ground truth
    assert len([f for f in os.listdir(os.path.join(out, "RealInt")) if f.endswith(".png")]) == 2
    scored = summary[:6]
    assert float(summary[-1]["psnr"]) == pytest.approx(np.mean([float(r["psnr"]) for r in scored]), abs=1e-3)
    assert float(summary[-1]["ssim"]) == pytest.approx(np.mean([float(r["ssim"]) for r in scored]), abs=1e-5)
    for name in ALL_SETS.split(","):
        rows = _csv(os.path.join(out, name, "results.csv"))
        assert {r["protocol"] for r in rows} == {protocol} and len(rows) == counts[name]
        assert all(os.path.isfile(os.path.join(out, name, r["name"])) for r in rows)
    # every per-image score is the protocol's score of that image (matlab protocols: of the saved PNG)
    did = _csv(os.path.join(out, "DID", "results.csv"))
    pairs = find_pairs(os.path.join(root, "DID", "test"), dataset_spec("DID").stacked_rain_half)
    _, clean = read_pair(*pairs[0])
    derained = read_image(os.path.join(out, "DID", did[0]["name"]))
    if protocol != "coic":
        p, s = score(derained, clean, protocol)
        assert float(did[0]["psnr"]) == pytest.approx(p, abs=1e-4)
        assert float(did[0]["ssim"]) == pytest.approx(s, abs=1e-6)
    md = open(os.path.join(out, "summary.md")).read()
    assert f"Metric protocol: `{protocol}`" in md and "| DDN | 14 |" in md and "| RealInt | 2 | — | — |" in md
    assert "| Mean |" in printed and protocol in printed
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_skip_existing_reuses_images_and_scores(setup, tmp_path, monkeypatch):
    root, ckpt = setup
    out = str(tmp_path / "out")
    assert _run(ckpt, root, out, "--metric_protocol", "matlab") == 0
    first = _csv(os.path.join(out, "summary.csv"))
    ddn_rows = _csv(os.path.join(out, "DDN", "results.csv"))

    def no_model(*args, **kwargs):
        raise AssertionError("an existing image was derained again")

    monkeypatch.setattr(evaluation, "restore", no_model)
    assert _run(ckpt, root, out, "--metric_protocol", "matlab", "--skip_existing") == 0
    assert _csv(os.path.join(out, "summary.csv")) == first
    # without a results file the scores come from the saved PNGs: identical under the matlab protocol
    os.remove(os.path.join(out, "DDN", "results.csv"))
    assert _run(ckpt, root, out, "--metric_protocol", "matlab", "--skip_existing") == 0
    assert _csv(os.path.join(out, "DDN", "results.csv")) == ddn_rows
    # a missing image is derained again, the others are not
    monkeypatch.undo()
    os.remove(os.path.join(out, "SPA", "000.png"))
    calls = []
    real_restore = evaluation.restore
    counting = lambda *a, **k: calls.append(1) or real_restore(*a, **k)  # noqa: E731
    monkeypatch.setattr(evaluation, "restore", counting)
    assert _run(ckpt, root, out, "--metric_protocol", "matlab", "--skip_existing") == 0
    assert len(calls) == 1 and os.path.isfile(os.path.join(out, "SPA", "000.png"))
    assert _csv(os.path.join(out, "summary.csv")) == first


def test_testset_errors_are_one_line(setup, tmp_path, capsys):
    root, ckpt = setup
    out = str(tmp_path / "o")
    assert test_model.main(["--test_model", ckpt, "--testset", "Rain100Q", "--data_root", root,
                            "--save_path", out]) == 2
    assert "unknown dataset 'Rain100Q'" in capsys.readouterr().err
    assert test_model.main(["--test_model", ckpt, "--testset", "SPA", "--data_root", str(tmp_path),
                            "--save_path", out]) == 2
    err = capsys.readouterr().err
    assert "--testset SPA" in err and "--data_root" in err and len(err.strip().splitlines()) == 1
