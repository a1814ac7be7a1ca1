"""The training pair keeps its geometry: the rainy crop and its clean partner are cut and
flipped together, and the encoder's view is the whole rainy image resized."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize as tv_resize

from datasets import MixedRainDataset, SampleKey

OFFSET = 30  # rain = clean + 30 grey levels, everywhere


@pytest.fixture(scope="module")
def offset_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offset")
    (root / "rain").mkdir()
    (root / "norain").mkdir()
    rng = np.random.default_rng(0)
    cleans = {}
    for name, (h, w) in {"1.png": (40, 52), "2.png": (36, 30)}.items():
        clean = rng.integers(0, 256 - OFFSET, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(clean).save(root / "norain" / name)
        Image.fromarray(clean + OFFSET).save(root / "rain" / name)
        cleans[name] = torch.from_numpy(clean.astype(np.float32) / 255).permute(2, 0, 1)
    return str(root), cleans


def _locate(crop, image):
    """(top, left, flip) with crop == image[:, top:, left:] flipped as the published code (1: rows, 2: columns)."""
    p = crop.shape[-1]
    h, w = image.shape[-2:]
    for top in range(h - p + 1):
        for left in range(w - p + 1):
            patch = image[:, top:top + p, left:left + p]
            for flip, view in ((0, patch), (1, patch.flip(1)), (2, patch.flip(2))):
                if torch.allclose(view, crop, atol=1e-6):
                    return top, left, flip
    return None


def test_crop_and_flip_shared_by_rain_and_clean_and_query_is_whole_image(offset_pairs):
    root, cleans = offset_pairs
    crop = 16
    data = MixedRainDataset([root], crop)
    places, flips = set(), set()
    for seed in range(60):
        index = seed % len(data)
        rain, clean, small_rain, small_clean = data[SampleKey(index, seed)]
        assert rain.shape == clean.shape == small_rain.shape == (3, crop, crop)
        torch.testing.assert_close(rain - clean, torch.full_like(rain, OFFSET / 255), atol=1e-6, rtol=0)
        name = data.pairs[index][1].rsplit("/", 1)[-1]
        found = _locate(clean, cleans[name])
        assert found is not None, seed
        places.add((name,) + found[:2])
        flips.add(found[2])
        # the encoder sees the whole image, resized (not the crop): bilinear with antialiasing
        whole_rain = (cleans[name] + OFFSET / 255)
        expected = tv_resize(whole_rain, [crop, crop], InterpolationMode.BILINEAR, antialias=True).clamp(0, 1)
        torch.testing.assert_close(small_rain, expected, atol=1e-5, rtol=0)
        expected_clean = tv_resize(cleans[name], [crop, crop], InterpolationMode.BILINEAR, antialias=True)
        torch.testing.assert_close(small_clean, expected_clean.clamp(0, 1), atol=1e-5, rtol=0)
    assert flips == {0, 1, 2}  # no flip, vertical, horizontal all occur
    assert len(places) > 20  # random crops, not one fixed window


def test_same_key_same_item_other_key_other_crop(offset_pairs):
    root, _ = offset_pairs
    data = MixedRainDataset([root], 16)
    a, b = data[SampleKey(0, 7)], data[SampleKey(0, 7)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(data[SampleKey(0, s)][0], a[0]) for s in range(8, 12))
