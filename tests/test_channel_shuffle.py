"""--channel_shuffle: one random permutation of the colour channels per item, the same for its four images."""
import itertools
import os

import torch

from datasets import MixedRainDataset, SampleKey


def _key(i: int, seed: int) -> SampleKey:
    return SampleKey(index=i, seed=seed, epoch=0, mix_seed=0)


def test_one_permutation_for_the_four_images_and_every_permutation_drawn(tiny_demo):
    folder = os.path.join(tiny_demo, "heavy", "train")
    plain = MixedRainDataset([folder], 16)
    shuffled = MixedRainDataset([folder], 16, channel_shuffle=True)
    seen = set()
    for seed in range(40):
        a, b = plain[_key(seed % 8, seed)], shuffled[_key(seed % 8, seed)]
        # the permutation that maps the unshuffled rainy crop onto the shuffled one
        matches = [p for p in itertools.permutations(range(3)) if torch.equal(a.rain[list(p)], b.rain)]
        assert matches, "the shuffled crop is not a channel permutation of the same crop"
        perm = next(p for p in matches if all(torch.equal(getattr(a, f)[list(p)], getattr(b, f))
                                              for f in ("clean", "query", "query_clean")))
        seen.add(perm)
    assert len(seen) == 6  # all six permutations occur in 40 draws (a chance of missing one: < 1e-2)


def test_without_the_flag_colours_stay(tiny_demo):
    folder = os.path.join(tiny_demo, "heavy", "train")
    data = MixedRainDataset([folder], 16)
    from utils.images import read_image
    from datasets import find_pairs

    rain_path, _ = find_pairs(folder)[0]
    whole = read_image(rain_path)
    item = data[_key(0, 3)]
    # the crop is a window of the file as it is (with the recipe's flips), channels in order
    found = False
    for flip in (None, 1, 2):
        img = whole if flip is None else whole.flip(flip)
        for top in range(whole.shape[1] - 15):
            for left in range(whole.shape[2] - 15):
                if torch.equal(img[:, top:top + 16, left:left + 16], item.rain):
                    found = True
    assert found


def test_the_trainer_passes_the_flag_to_its_dataset(tmp_path, tiny_demo):
    from helpers import make_trainer

    data = os.path.join(tiny_demo, "heavy", "train")
    assert make_trainer(tmp_path / "a", data, extra=["--channel_shuffle"]).dataset.channel_shuffle is True
    assert make_trainer(tmp_path / "b", data).dataset.channel_shuffle is False
