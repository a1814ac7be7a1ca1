import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DataError, EpochSampler, MixedRainDataset, SampleKey, find_pairs, parse_data_paths, read_image


def _img(path, size=(20, 24), mode="RGB", value=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(path)) % 2 ** 32)
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    arr = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def test_pairing_rules(tmp_path):
    root = str(tmp_path)
    names = [("norain-3x2.png", "norain-3.png"), ("rain-007.png", "norain-007.png"),
             ("12_3.jpg", "12.jpg"), ("12_14.jpg", "12.jpg"), ("same.png", "same.png")]
    for rain, clean in names:
        _img(os.path.join(root, "rain", rain))
        _img(os.path.join(root, "norain", clean))
    pairs = {os.path.basename(r): os.path.basename(c) for r, c in find_pairs(root)}
    assert pairs == dict(names)


def test_missing_partner_and_empty_folder_errors(tmp_path):
    root = str(tmp_path / "set")
    _img(os.path.join(root, "rain", "a.png"))
    os.makedirs(os.path.join(root, "norain"))
    with pytest.raises(DataError, match="a.png has no clean partner"):
        find_pairs(root)
    empty = str(tmp_path / "empty")
    os.makedirs(os.path.join(empty, "rain"))
    os.makedirs(os.path.join(empty, "norain"))
    with pytest.raises(DataError, match="yields no rain/clean pairs"):
        find_pairs(empty)
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no norain/"):
        os.makedirs(str(tmp_path / "half" / "rain"))
        find_pairs(str(tmp_path / "half"))
    with pytest.raises(DataError, match="empty"):
        parse_data_paths(" , ")


def test_read_image_converts_grey_rgba_16bit(tmp_path):
    _img(str(tmp_path / "g.png"), mode="L", value=128)
    _img(str(tmp_path / "a.png"), mode="RGBA", value=64)
    Image.fromarray(np.full((5, 6), 65535 // 2, np.uint16)).save(str(tmp_path / "w.png"))
    for name, expected in (("g.png", 128 / 255), ("a.png", 64 / 255), ("w.png", (65535 // 2) / 65535)):
        img = read_image(str(tmp_path / name))
        assert img.shape[0] == 3 and img.dtype == torch.float32
        assert float(img.mean()) == pytest.approx(expected, abs=1e-3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_image(str(tmp_path / "bad.png"))


def test_read_image_converts_palette_and_cmyk(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[1:, :, 2] = 200, 30
    Image.fromarray(rgb).quantize(colors=4).save(str(tmp_path / "p.png"))  # palette PNG: values are indices
    Image.fromarray(rgb).convert("CMYK").save(str(tmp_path / "c.jpg"), quality=100)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(read_image(str(tmp_path / "p.png")), expected, atol=1 / 255, rtol=0)
    torch.testing.assert_close(read_image(str(tmp_path / "c.jpg")), expected, atol=12 / 255, rtol=0)


def test_items_crops_and_determinism(tmp_path):
    root = str(tmp_path)
    for i in range(3):
        _img(os.path.join(root, "rain", f"{i}.png"), size=(30, 40))
        _img(os.path.join(root, "norain", f"{i}.png"), size=(30, 40))
    _img(os.path.join(root, "rain", "small.png"), size=(10, 12))
    _img(os.path.join(root, "norain", "small.png"), size=(10, 12))
    ds = MixedRainDataset([root, root], crop_size=16)
    assert len(ds) == 8
    rain, clean, q, qc = ds[SampleKey(0, 5)]
    assert rain.shape == clean.shape == q.shape == qc.shape == (3, 16, 16)
    assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in (rain, clean, q, qc))
    again = ds[SampleKey(0, 5)]
    assert all(torch.equal(a, b) for a, b in zip((rain, clean, q, qc), again))
    small = [i for i, (r, _) in enumerate(ds.pairs) if r.endswith("small.png")][0]
    assert ds[SampleKey(small, 1)][0].shape == (3, 16, 16)  # padded up to the crop
    # the crop is taken at the same place in the rainy and the clean image
    full_r, full_c = read_image(ds.pairs[0][0]), read_image(ds.pairs[0][1])
    found = [(i, j) for i in range(15) for j in range(25) if torch.equal(full_c[:, i:i + 16, j:j + 16], clean)
             or torch.equal(full_c[:, i:i + 16, j:j + 16].flip(1), clean)
             or torch.equal(full_c[:, i:i + 16, j:j + 16].flip(2), clean)]
    assert found
    i, j = found[0]
    crop = full_r[:, i:i + 16, j:j + 16]
    assert any(torch.equal(rain, t) for t in (crop, crop.flip(1), crop.flip(2)))


def test_size_mismatch_is_clear(tmp_path):
    _img(str(tmp_path / "rain" / "a.png"), size=(20, 20))
    _img(str(tmp_path / "norain" / "a.png"), size=(21, 20))
    ds = MixedRainDataset([str(tmp_path)], crop_size=8)
    with pytest.raises(DataError, match="pair sizes differ"):
        ds[0]


def test_epoch_sampler_resumes_mid_epoch():
    full = list(EpochSampler(10, 4, seed=3, epoch=2))
    assert len(full) == 12  # padded to whole batches
    assert sorted({k.index for k in full}) == list(range(10))
    tail = list(EpochSampler(10, 4, seed=3, epoch=2, start_batch=1))
    assert tail == full[4:]
    assert [k.index for k in EpochSampler(10, 4, seed=3, epoch=3)] != [k.index for k in full]
    ranks = [list(EpochSampler(10, 2, seed=0, epoch=0, rank=r, world_size=2)) for r in range(2)]
    assert not {k.index for k in ranks[0][:2]} & {k.index for k in ranks[1][:2]}
