"""Both sides of the size and count edges of the training data (datasets.py) and the exemplars
(utils/train/exemplars.py). Datasets are built without folders (``__new__`` and the fields the
method reads), so each test is about one edge and runs in milliseconds."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets
from datasets import MAX_CONSECUTIVE_SKIPS, EpochSampler, MixedRainDataset, estimate_decoded_bytes
from utils.errors import DataError
from utils.train.exemplars import RainArchive, random_flips


def _no_flip_rng(seed_from: int = 0) -> random.Random:
    """A Random whose third draw (the flip, after top and left) is neither 1 nor 2: no flip."""
    for seed in range(seed_from, seed_from + 100):
        r = random.Random(seed)
        r.randint(0, 0), r.randint(0, 0)
        if r.randint(0, 3) in (0, 3):
            return random.Random(seed)
    raise AssertionError("no seed without a flip")


def _augment(rain: torch.Tensor, crop: int):
    ds = SimpleNamespace(crop_size=crop, channel_shuffle=False)
    return MixedRainDataset._augment(ds, rain, rain.clone(), _no_flip_rng())


def _np_pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> np.ndarray:
    return np.pad(x.numpy(), ((0, 0), (0, ph), (0, pw)), mode=mode)


@pytest.mark.parametrize("h, w", [(8, 8)])
def test_augment_crop_equal_to_the_image_takes_it_whole(h, w):
    x = torch.rand(3, h, w)
    item = _augment(x, 8)
    torch.testing.assert_close(item.rain, x)


@pytest.mark.parametrize("h, w, mode", [
    (5, 8, "reflect"),   # 5 > 8 // 2: reflection (its pad of 3 is shorter than the side)
    (4, 8, "edge"),      # 4 = 8 // 2: replication (a reflection of 4 rows would need 5)
    (8, 5, "reflect"),   # only the width is smaller
    (8, 4, "edge"),
    (7, 7, "reflect"),   # one short on both sides
])
def test_augment_pads_a_small_side_by_reflection_above_half_the_crop(h, w, mode):
    x = torch.rand(3, h, w)
    item = _augment(x, 8)
    assert item.rain.shape == (3, 8, 8)
    np.testing.assert_array_equal(item.rain.numpy(), _np_pad(x, 8 - h, 8 - w, mode))
    torch.testing.assert_close(item.clean, item.rain)


def test_augment_one_side_larger_than_the_crop_is_cropped_not_padded():
    x = torch.rand(3, 5, 12)
    item = _augment(x, 8)
    assert item.rain.shape == (3, 8, 8)
    left = next(j for j in range(5) if torch.equal(item.rain[:, :5], x[:, :, j:j + 8]))  # the crop of x, whichever
    np.testing.assert_array_equal(item.rain.numpy(), _np_pad(x[:, :, left:left + 8], 3, 0, "reflect"))


# ------------------------------------------------------------------ the sampler's counts
@pytest.mark.parametrize("n, batch, world, expected", [
    (0, 4, 1, 1), (1, 4, 1, 1), (4, 4, 1, 1), (5, 4, 1, 2), (8, 4, 1, 2), (9, 2, 2, 3), (8, 2, 2, 2)])
def test_batches_per_epoch_edges(n, batch, world, expected):
    assert EpochSampler.batches_per_epoch(n, batch, world) == expected


@pytest.mark.parametrize("start, length", [(0, 6), (2, 2), (3, 0), (4, 0)])
def test_sampler_length_from_a_start_batch(start, length):
    sampler = EpochSampler(5, batch_size=2, seed=0, start_batch=start)  # 5 items: 3 batches of 2
    assert len(sampler) == length == len(list(sampler))


def test_sampler_pads_to_whole_batches_with_every_item():
    keys = list(EpochSampler(5, batch_size=2, seed=3))
    assert len(keys) == 6 and {k.index for k in keys} == set(range(5))


def test_sampler_ranks_share_each_step():
    both = [list(EpochSampler(6, batch_size=2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(k) for k in both] == [4, 4]  # ceil(6 / (2 x 2)) = 2 steps of 2 per rank: 8 keys, 2 repeated
    indices = [k.index for keys in both for k in keys]
    assert set(indices) == set(range(6)) and len(indices) == 8


# ------------------------------------------------------------------ mix, cache, skips
def _dataset(n_syn: int, n_real: int) -> MixedRainDataset:
    ds = MixedRainDataset.__new__(MixedRainDataset)
    ds.synthetic_pairs = [(f"s{i}r", f"s{i}c") for i in range(n_syn)]
    ds.real_pairs = [(f"r{i}r", f"r{i}c") for i in range(n_real)]
    ds.synthetic_sources, ds.real_sources = ["syn"] * n_syn, ["real"] * n_real
    ds._draws_real = n_syn > 0 and n_real > n_syn
    ds._len = n_syn + (n_syn if ds._draws_real else n_real)
    ds._draws, ds.strict, ds._skipped = {}, False, datasets._SharedCounter()
    ds._images, ds._unreadable = None, {}
    return ds


def test_pair_at_switches_to_real_pairs_at_the_synthetic_count():
    ds = _dataset(3, 5)
    assert ds._pair_at(2, 0, 0) == ("s2r", "s2c")
    assert ds._pair_at(3, 0, 0) == ds.real_pairs[int(ds.real_draw(0, 0)[0])]


def test_real_draws_kept_per_process():
    ds = _dataset(2, 5)
    for epoch in range(datasets._KEPT_DRAWS):
        ds.real_draw(epoch, 0)
    assert len(ds._draws) == datasets._KEPT_DRAWS
    ds.real_draw(datasets._KEPT_DRAWS, 0)
    assert len(ds._draws) == datasets._KEPT_DRAWS and (0, 0) not in ds._draws


@pytest.mark.parametrize("n, tried", [(3, 3), (MAX_CONSECUTIVE_SKIPS, MAX_CONSECUTIVE_SKIPS),
                                      (MAX_CONSECUTIVE_SKIPS + 1, MAX_CONSECUTIVE_SKIPS)])
def test_consecutive_skips_stop_at_the_limit(n, tried):
    ds = _dataset(n, 0)
    ds._images = {}
    ds._unreadable = {p: "broken" for pair in ds.synthetic_pairs for p in pair}
    with pytest.raises(DataError, match=f"^{tried} unreadable training pairs in a row"):
        ds[0]
    assert ds.skipped == tried


def test_estimated_bytes_read_every_header_up_to_the_sample(monkeypatch):
    read = []

    def header(path):
        read.append(path)
        return SimpleNamespace(native_bytes=int(path[1:]))

    monkeypatch.setattr(datasets.images, "read_header", header)
    paths = [f"p{i}" for i in range(10)]
    assert estimate_decoded_bytes(paths, sample=10) == sum(range(10)) and len(read) == 10
    read.clear()
    assert estimate_decoded_bytes(paths, sample=9) == int((0 + 2 + 4 + 6 + 8) / 5 * 10) and len(read) == 5


@pytest.mark.parametrize("extra, refused", [(0, False), (1, True)])
def test_cache_refuses_only_above_the_memory_fraction(monkeypatch, extra, refused):
    monkeypatch.setattr(datasets, "available_memory", lambda: 1000)
    monkeypatch.setattr(datasets, "estimate_decoded_bytes", lambda paths: 800 + extra)
    ds = _dataset(0, 0)
    if refused:
        with pytest.raises(DataError, match="--cache_images needs"):
            ds.cache_images(progress=False, memory_fraction=0.8)
    else:
        ds.cache_images(progress=False, memory_fraction=0.8)
        assert ds._images == {}


# ------------------------------------------------------------------ exemplars
@pytest.mark.parametrize("batch, capacity", [(64, 1), (65, 1), (32, 2), (33, 1), (0, 64), (1, 64)])
def test_rain_archive_capacity_from_the_batch_size(batch, capacity):
    assert RainArchive.for_batch_size(batch, images=64).capacity == capacity


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_rain_archive_keeps_exactly_capacity_batches(capacity):
    archive = RainArchive(capacity)
    for k in range(capacity + 2):
        archive.push(torch.full((1, 1, 1, 1), float(k)))
    assert [float(t) for t in archive.layers] == [float(k) for k in range(2, capacity + 2)]
    assert RainArchive(0).capacity == 1


def test_random_flips_flip_with_probability_one_half():
    x = torch.arange(4.0).view(1, 1, 2, 2).expand(4000, 1, 2, 2)
    out = random_flips(x, torch.Generator().manual_seed(0))
    h = (out[:, 0, 0, 0] == 1) | (out[:, 0, 0, 0] == 3)  # the top-left pixel came from the right column
    v = out[:, 0, 0, 0] >= 2  # ... from the bottom row
    assert abs(float(h.float().mean()) - 0.5) < 0.03 and abs(float(v.float().mean()) - 0.5) < 0.03


def test_sample_seeds_are_integers_distinct_across_run_seeds_and_epochs():
    seen = set()
    for run_seed in range(4):
        for epoch in range(3):
            sampler = EpochSampler(5, 2, run_seed, epoch=epoch)
            seeds = [key.seed for key in sampler]
            assert all(type(s) is int for s in seeds)  # random.Random(seed) must see the same int on every platform
            assert not seen & set(seeds)
            seen |= set(seeds)


def _png(path, value: float) -> None:
    from utils.images import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.full((3, 8, 8), value), str(path))


@pytest.mark.parametrize("n_syn, n_real, draws_real, length", [(1, 2, True, 2), (1, 1, False, 2), (0, 2, False, 2)])
def test_real_pairs_are_drawn_from_one_synthetic_pair_on(tmp_path, n_syn, n_real, draws_real, length):
    """SPA is drawn down to the synthetic count once there is a synthetic pair (n_syn = 1 is the edge)
    and more real pairs than synthetic ones; otherwise every pair is used."""
    folders = []
    if n_syn:
        for i in range(n_syn):
            _png(tmp_path / "syn" / "rain" / f"{i}.png", 0.5)
            _png(tmp_path / "syn" / "norain" / f"{i}.png", 0.4)
        folders.append(str(tmp_path / "syn"))
    for k in range(n_real):
        _png(tmp_path / "spa" / "real_world" / "S" / "S-1" / f"S-1_{k}_0.png", 0.6)
        _png(tmp_path / "spa" / "real_world_gt" / "S" / f"S_{k}_0.png", 0.3)
    folders.append(str(tmp_path / "spa"))
    ds = MixedRainDataset(folders, crop_size=8)
    assert (len(ds.synthetic_pairs), len(ds.real_pairs)) == (n_syn, n_real)
    assert ds.real_sources == [str(tmp_path / "spa")] * n_real
    assert len(ds) == length and (len(ds.real_draw(0, 0)) < n_real) is draws_real


def test_exemplars_draw_only_from_the_run_generator():
    """The same generator state gives the same exemplars whatever the global RNG has drawn (resume)."""
    from utils.train.exemplars import build_negatives

    torch.manual_seed(0)
    query, clean = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        outs.append(build_negatives(query, clean, RainArchive(2), 3, torch.Generator().manual_seed(5)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_crop_and_flip_follow_the_reference_draws():
    """top, left, then one of four flip codes (1 vertical, 2 horizontal, 0 and 3 none), drawn in that order
    from the item's Random: the crop and flip of each seed, against a hand-written loop."""
    img = torch.arange(3 * 7 * 9, dtype=torch.float32).view(3, 7, 9)
    ds = SimpleNamespace(crop_size=4, channel_shuffle=False)
    flips = set()
    for seed in range(40):
        r = random.Random(seed)
        top, left, flip = r.randint(0, 3), r.randint(0, 5), r.randint(0, 3)
        want = img[:, top:top + 4, left:left + 4]
        want = want.flip(flip) if flip in (1, 2) else want
        item = MixedRainDataset._augment(ds, img, img.clone(), random.Random(seed))
        assert torch.equal(item.rain, want) and torch.equal(item.clean, want)
        flips.add(flip)
    assert flips == {0, 1, 2, 3}


def test_gathered_rain_layers_enter_the_archive():
    """Distributed runs: the archive takes every rank's rain layers (``gather``), not this rank's alone."""
    from utils.train.exemplars import build_negatives

    query, clean = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    others = torch.rand(2, 3, 8, 8)
    archive = RainArchive(1)
    build_negatives(query, clean, archive, 1, torch.Generator().manual_seed(0),
                    gather=lambda t: torch.cat([t, others]))
    assert torch.equal(archive.layers[0], torch.cat([query - clean, others]))
