"""One DataLoader for the whole run: per-epoch real-pair draws inside the workers, resume, image cache."""
import collections
import logging
import os
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import make_trainer, train_flags
from PIL import Image
from torch.utils.data import DataLoader

import datasets
from datasets import DataError, EpochSampler, MixedRainDataset, SampleKey
from utils import images
from utils.train import trainer as trainer_module
from utils.train.trainer import Trainer

SEED = 5


def _spa_folder(root: str, scenes: int = 2, clips: int = 2, crops: int = 3, size: int = 24) -> str:
    """A fake SPA training tree: real_world/S/S-k/S-k_x_y.png <-> real_world_gt/S/S_x_y.png."""
    rng = np.random.default_rng(0)
    for s in range(1, scenes + 1):
        scene = f"{s:03d}"
        for x in range(crops):
            clean = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
            gt = os.path.join(root, "real_world_gt", scene, f"{scene}_{x}_0.png")
            os.makedirs(os.path.dirname(gt), exist_ok=True)
            Image.fromarray(clean).save(gt)
            for k in range(1, clips + 1):
                rain = os.path.join(root, "real_world", scene, f"{scene}-{k}", f"{scene}-{k}_{x}_0.png")
                os.makedirs(os.path.dirname(rain), exist_ok=True)
                Image.fromarray(np.clip(clean.astype(int) + rng.integers(0, 56, clean.shape), 0, 255)
                                .astype(np.uint8)).save(rain)
    return root


@pytest.fixture(scope="module")
def mixed(tiny_demo, tmp_path_factory) -> list[str]:
    """8 synthetic pairs + 12 real (SPA) pairs: every epoch mixes the 8 with a new draw of 8 real ones."""
    return [os.path.join(tiny_demo, "heavy", "train"), _spa_folder(str(tmp_path_factory.mktemp("spa") / "spa"))]


def _epochs(ds: MixedRainDataset, num_workers: int, epochs: int, batch: int = 4, after_epoch=None) -> list[list]:
    """Every batch of ``epochs`` epochs from one DataLoader (persistent workers when there are any)."""
    sampler = EpochSampler(len(ds), batch, SEED)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(list(loader))
        if after_epoch is not None:
            after_epoch(epoch)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_batches_identical_for_any_worker_count_across_epochs(tmp_path, mixed, monkeypatch):
    ds = MixedRainDataset(mixed, crop_size=16)
    assert len(ds) == 16 and len(ds.real_pairs) == 12
    draws = [tuple(ds.real_draw(epoch, SEED)) for epoch in range(3)]
    assert len(set(draws)) == 3  # each epoch mixes in other real pairs
    reference = _epochs(ds, 0, 3)
    log = tmp_path / "reads.txt"
    reads, read_in_epoch = _counting_reads(monkeypatch, log), []

    def files_read(epoch):
        read_in_epoch.append((epoch, set(reads())))
        log.unlink(missing_ok=True)

    for workers in (1, 2):
        got = _epochs(MixedRainDataset(mixed, crop_size=16), workers, 3, after_epoch=files_read)
        for epoch in range(3):
            assert len(got[epoch]) == len(reference[epoch]) == 4
            for b_ref, b_got in zip(reference[epoch], got[epoch]):
                assert _same(b_ref, b_got), (workers, epoch)
    # the workers read exactly the files of each epoch's own mix (every index is visited once)
    assert len(read_in_epoch) == 6
    for epoch, files in read_in_epoch:
        assert files == {p for pair in ds.epoch_pairs(epoch, SEED) for p in pair}, epoch
    assert not _same(reference[0][0], reference[1][0])


def test_sampler_set_epoch_resumes_mid_epoch():
    sampler = EpochSampler(10, 4, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert full == list(EpochSampler(10, 4, seed=3, epoch=2))
    assert {(k.epoch, k.mix_seed) for k in full} == {(2, 3)}
    sampler.set_epoch(2, start_batch=1)
    assert list(sampler) == full[4:] and len(sampler) == 8


def _record_steps(monkeypatch) -> list:
    """Batches every ``Trainer.train_step`` sees, in order (the real step still runs)."""
    seen = []
    step = Trainer.train_step

    def recording(self, batch, *args, **kwargs):
        seen.append([t.clone() for t in batch])
        return step(self, batch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", recording)
    return seen


def test_resumed_run_sees_the_same_batches(tmp_path, mixed, monkeypatch):
    # 16 items, batch 2: 8 iterations per epoch; the part run stops at 5 (mid-epoch) and the
    # resumed one crosses into epoch 1 with a new draw of real pairs; worker counts differ on purpose.
    seen = _record_steps(monkeypatch)
    full = make_trainer(tmp_path / "full", mixed, tot_iters=12, stage1_iters=6, num_workers=1)
    full.train()
    full_batches = list(seen)
    seen.clear()
    make_trainer(tmp_path / "part", mixed, tot_iters=5, stage1_iters=6, save_freq=100, num_workers=0).train()
    resumed = make_trainer(tmp_path / "part", mixed, tot_iters=12, stage1_iters=6, num_workers=1)
    assert (resumed.iteration, resumed.batch_in_epoch) == (5, 5)
    resumed.train()
    assert len(seen) == len(full_batches) == 12
    for i, (a, b) in enumerate(zip(full_batches, seen)):
        assert _same(a, b), f"batch {i} differs"
    assert resumed.epoch == full.epoch == 1
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_one_loader_and_one_set_of_workers_serve_every_epoch(tmp_path, mixed, monkeypatch):
    # The worker cap is cores - 1: state two cores, whatever the host has.
    monkeypatch.setattr(trainer_module.os, "cpu_count", lambda: 2)
    made = []

    class CountingLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "DataLoader", CountingLoader)
    log = tmp_path / "reads.txt"
    getitem = MixedRainDataset.__getitem__

    def logging_getitem(self, key):  # runs in the worker: the pid says which process served the key
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {key.epoch}\n")
        return getitem(self, key)

    monkeypatch.setattr(MixedRainDataset, "__getitem__", logging_getitem)
    trainer = make_trainer(tmp_path / "run", mixed, tot_iters=20, stage1_iters=100, batch_size=4, num_workers=1)
    trainer.train()  # 4 iterations per epoch: 5 epochs
    assert trainer.epoch == 5
    assert len(made) == 1 and made[0]["persistent_workers"] is True and made[0]["num_workers"] == 1
    served = collections.defaultdict(set)
    for line in log.read_text().split("\n"):
        if line:
            pid, epoch = map(int, line.split())
            served[pid].add(epoch)
    assert len(served) == 1, f"workers restarted: {dict(served)}"
    pid, epochs = next(iter(served.items()))
    assert pid != os.getpid() and epochs == {0, 1, 2, 3, 4}


def test_starting_an_epoch_leaves_the_global_rng_alone(tmp_path, mixed):
    # the model may draw from it (drop path): it must not depend on how often a loader iterator starts
    trainer = make_trainer(tmp_path, mixed, num_workers=0)
    state = torch.get_rng_state()
    for epoch in range(2):
        trainer.epoch = epoch
        next(iter(trainer._loader()))
    assert torch.equal(state, torch.get_rng_state())


def _counting_reads(monkeypatch, log) -> Callable[[], collections.Counter]:
    """A Counter of image decodes by path, filled from ``log`` (decodes in forked workers count too)."""
    reads = collections.Counter()
    decode = images.decode_native

    def counting(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{path}\n")
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(images, "decode_native", counting)

    def count() -> collections.Counter:
        reads.clear()
        if os.path.exists(log):
            reads.update(ln for ln in open(log).read().split("\n") if ln)
        return reads

    return count


def test_cache_images_gives_the_same_items_and_reads_each_file_once(tmp_path, mixed, monkeypatch):
    plain = MixedRainDataset(mixed, crop_size=16)
    expected = _epochs(plain, 0, 3)
    reads = _counting_reads(monkeypatch, tmp_path / "reads.txt")
    cached = MixedRainDataset(mixed, crop_size=16)
    cached.cache_images(progress=False)
    files = {p for pair in cached.synthetic_pairs + cached.real_pairs for p in pair}
    assert set(reads()) == files and set(reads().values()) == {1}
    assert all(a.dtype == np.uint8 for a, _ in cached._images.values())
    for workers in (0, 1):  # the forked worker reads the cache too
        got = _epochs(cached, workers, 3)
        for epoch in range(3):
            assert all(_same(a, b) for a, b in zip(expected[epoch], got[epoch])), (workers, epoch)
    assert set(reads()) == files and set(reads().values()) == {1}  # nothing read again, here or in the worker
    key = SampleKey(3, 7, epoch=1, mix_seed=SEED)
    assert _same(plain[key], cached[key])


def test_cache_keeps_the_skip_and_strict_rules(tmp_path, tiny_demo, caplog, monkeypatch):
    root = tmp_path / "set"
    for sub in ("rain", "norain"):
        os.makedirs(root / sub)
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i + (80 if sub == "rain" else 0), np.uint8)).save(
                root / sub / f"{i}.png")
    (root / "rain" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    plain = MixedRainDataset([str(root)], crop_size=8)
    expected = plain[SampleKey(1, 4)]
    assert plain.skipped == 1
    reads = _counting_reads(monkeypatch, tmp_path / "reads.txt")
    ds = MixedRainDataset([str(root)], crop_size=8)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds.cache_images(progress=False)
        assert "1.png" in caplog.text
        caplog.clear()
        item = ds[SampleKey(1, 4)]  # skipped like an uncached unreadable file: the next pair, counted
        reason = caplog.text  # the reason found while caching, given again when the pair is skipped
    assert ds.skipped == 1 and _same(item, expected)
    assert "1.png" in reason and "cannot read image" in reason, reason
    assert reads()[str(root / "rain" / "1.png")] == 1
    strict = MixedRainDataset([str(root)], crop_size=8, strict=True)
    with pytest.raises(DataError, match=r"rain.1\.png.*strict"):
        strict.cache_images(progress=False)


def test_cache_refuses_beyond_the_memory_budget(tmp_path, tiny_demo, monkeypatch, capsys, caplog):
    data = os.path.join(tiny_demo, "light", "train")
    ds = MixedRainDataset([data], crop_size=16)
    need = datasets.estimate_decoded_bytes([p for pair in ds.synthetic_pairs for p in pair])
    assert need == 16 * 32 * 32 * 3  # 8 pairs of 32x32 RGB, one byte per value
    monkeypatch.setattr(datasets, "available_memory", lambda: need)  # the cache may take 80% of it
    with pytest.raises(DataError, match="--cache_images needs about") as err:
        ds.cache_images(progress=False)
    assert "\n" not in str(err.value)
    from utils.train.run import main

    code = main("BRN", train_flags(str(tmp_path / "run"), data) + ["--cache_images"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--cache_images" in lines[0] and "available" in lines[0]
    # unknown available memory: a warning, and the cache is built anyway
    monkeypatch.setattr(datasets, "available_memory", lambda: None)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds.cache_images(progress=False)
    assert "cannot tell the available memory" in caplog.text and len(ds._images) == 16


def test_available_memory_reads_meminfo():
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo here")
    with open("/proc/meminfo") as f:
        listed = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")), None)
    found = datasets.available_memory()
    assert found is not None and found > 0 and (listed is None or found <= listed)


def test_integer_index_reads_the_mix_of_epoch_zero(mixed, monkeypatch):
    ds = MixedRainDataset(mixed, 16)
    assert ds.epoch_pairs(0, 0) != ds.epoch_pairs(1, 0)  # the real draw changes with the epoch
    read = []
    real = datasets.read_pair
    monkeypatch.setattr(datasets, "read_pair", lambda a, b, *k: (read.append((a, b)), real(a, b, *k))[1])
    for i in range(len(ds)):
        ds[i]
    assert read == [tuple(p) for p in ds.epoch_pairs(0, 0)]


def test_decoded_int32_grey_is_scaled_by_its_maximum(tmp_path):
    # PIL mode "I" (32-bit integers, e.g. from TIFF): scaled to [0, 1] by the image's own maximum
    arr = np.array([[0, 1000], [500, 2000]], dtype=np.int32)
    path = str(tmp_path / "grey32.tif")
    Image.fromarray(arr, mode="I").save(path)
    img = images.read_image(path)
    expected = torch.tensor([[0.0, 0.5], [0.25, 1.0]])
    assert img.shape == (3, 2, 2)
    for c in range(3):
        torch.testing.assert_close(img[c], expected)
