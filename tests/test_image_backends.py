"""PNG on OpenCV: the same pixels as Pillow (lossless), JPEG kept on Pillow (truncated files fail)."""
import numpy as np
import pytest
import torch
from PIL import Image

from utils import images


def _files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
    made = {
        "rgb": Image.fromarray(rgb),
        "grey": Image.fromarray(rgb[..., 0]),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "grey_alpha": Image.fromarray(rgb[..., 0]).convert("LA"),
        "palette": Image.fromarray(rgb).convert("P"),
        "bilevel": Image.fromarray(rgb[..., 0] > 127),
        "grey16": Image.fromarray(grey16),
    }
    paths = {}
    for name, img in made.items():
        paths[name] = str(tmp_path / f"{name}.png")
        img.save(paths[name])
    return paths


def test_png_pixels_equal_pillow_for_every_mode(tmp_path, monkeypatch):
    for name, path in _files(tmp_path).items():
        monkeypatch.setattr(images, "PNG_BACKEND", "pillow")
        pillow = images.read_image(path)
        monkeypatch.setattr(images, "PNG_BACKEND", "opencv")
        opencv = images.read_image(path)
        assert torch.equal(pillow, opencv), name


def test_png_really_decoded_by_opencv(tmp_path, monkeypatch):
    path = _files(tmp_path)["rgb"]
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: pytest.fail("Pillow opened a PNG"))
    assert images.read_image(path).shape == (3, 9, 7)


def test_16bit_rgb_png_keeps_its_16_bits(tmp_path):
    import cv2

    rgb16 = np.random.default_rng(1).integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    path = str(tmp_path / "rgb16.png")
    cv2.imwrite(path, rgb16[..., ::-1])  # OpenCV writes BGR
    img = images.read_image(path)
    expected = torch.from_numpy(rgb16.astype(np.float32) / 65535.0).permute(2, 0, 1)
    torch.testing.assert_close(img, expected, atol=0, rtol=0)


def test_written_png_reads_back_exactly_and_jpeg_stays_on_pillow(tmp_path, capsys):
    img = torch.rand(3, 10, 12)
    images.save_image(img, str(tmp_path / "out.png"))
    with Image.open(tmp_path / "out.png") as f:  # an ordinary PNG, any reader
        back = np.asarray(f.convert("RGB"))
    assert np.array_equal(back, img.mul(255).round().byte().permute(1, 2, 0).numpy())
    rgb = (img * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(images.UnreadableImageError, match="t.jpg"):
        images.read_image(str(tmp_path / "t.jpg"))  # OpenCV would decode it silently
    png = (tmp_path / "out.png").read_bytes()
    (tmp_path / "t.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(images.UnreadableImageError, match="t.png"):
        images.read_image(str(tmp_path / "t.png"))


def test_image_io_benchmark_measures_both_backends(tmp_path):
    from benchmarks.image_io import measure, report, synthetic_pairs

    folder = synthetic_pairs(str(tmp_path), 60, 40, count=2)
    row = measure(folder, repeats=1, crop=16)
    assert row["size"] == "60x40"
    for key in ("decode", "item", "epoch", "write"):
        assert row[f"{key}_pillow"] > 0 and row[f"{key}_opencv"] > 0
    assert images.PNG_BACKEND == "opencv"  # restored after timing the Pillow path
    assert "| 60x40 | 60x40 |" in report([row])
