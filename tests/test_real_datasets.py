"""The seven public datasets' real layouts, in miniature: pairing, stacked halves, prepare, check, SPA mixing."""
import collections
import logging
import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import (
    DataError,
    MixedRainDataset,
    SampleKey,
    StackedHalf,
    check_root,
    dataset_spec,
    find_pairs,
    prepare,
    read_image,
    read_pair,
    scan_folder,
)
from utils.data import cli as dataset_cli

H, W = 24, 32  # every picture; stacked ones are H x 2W
RAIN_LIFT = 70  # rainy = clean + RAIN_LIFT (+ streaks): the rainy half is always the brighter one


def _arrays(key: str) -> tuple[np.ndarray, np.ndarray]:
    """(rainy, clean) uint8 (H,W,3) pictures, a function of ``key``."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    clean = rng.integers(30, 150, (H, W, 3)).astype(np.int32)
    rain = clean + RAIN_LIFT
    rain[:, ::4] += 40  # streaks
    return np.clip(rain, 0, 255).astype(np.uint8), clean.astype(np.uint8)


def _save(arr: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **({"quality": 95} if path.endswith(".jpg") else {}))


def _pair(root: str, rain_rel: str, clean_rel: str, key: str) -> None:
    rain, clean = _arrays(key)
    _save(rain, os.path.join(root, rain_rel))
    if not os.path.exists(os.path.join(root, clean_rel)):
        _save(clean, os.path.join(root, clean_rel))


def _stacked(path: str, key: str, rain_half: str) -> None:
    rain, clean = _arrays(key)
    _save(np.concatenate([rain, clean] if rain_half == "left" else [clean, rain], axis=1), path)


def build_real_tree(root: str) -> dict:
    """A miniature ``datasets/`` with every dataset's real naming; returns the expected pair counts."""
    for name in ("Rain200L", "Rain200H"):
        for split, n in (("train", 3), ("test", 2)):
            for i in range(1, n + 1):
                _pair(root, f"{name}/{split}/rain/norain-{i}x2.png", f"{name}/{split}/norain/norain-{i}.png",
                      f"{name}{split}{i}")
    for split in ("train", "test"):
        for i in (1, 2):
            _pair(root, f"Rain800/{split}/rain/rain-{i:03d}.png", f"Rain800/{split}/norain/norain-{i:03d}.png",
                  f"r800{split}{i}")
            # DID: training set already prepared (split, same names), test set still stacked as published
    for i in (1, 2):
        _pair(root, f"DID/train/rain/{i}.png", f"DID/train/norain/{i}.png", f"didtrain{i}")
        _stacked(os.path.join(root, f"DID/test/{i}.jpg"), f"didtest{i}", "left")
    for split, scenes in (("train", (1, 2)), ("test", (901,))):
        for i in scenes:
            for j in range(1, 15):  # 14 rain variants share one clean image
                _pair(root, f"DDN/{split}/rain/{i}_{j}.jpg", f"DDN/{split}/norain/{i}.jpg", f"ddn{i}")
    for s in ("001", "002"):
        for k in (1, 2):
            for x, y in ((0, 0), (0, 1)):
                _pair(root, f"spa/real_world/{s}/{s}-{k}/{s}-{k}_{x}_{y}.png", f"spa/real_world_gt/{s}/{s}_{x}_{y}.png",
                      f"spa{s}{x}{y}")
    for n in (0, 1):
        _pair(root, f"spa/real_test_1000/rain/{n:03d}.png", f"spa/real_test_1000/gt/{n:03d}gt.png", f"spatest{n}")
    for n in (1, 2):
        _save(_arrays(f"realint{n}")[0], os.path.join(root, f"RealInt/{n}.png"))
    return {("Rain200L", "train"): 3, ("Rain200L", "test"): 2, ("Rain200H", "train"): 3, ("Rain200H", "test"): 2,
            ("Rain800", "train"): 2, ("Rain800", "test"): 2, ("DID", "train"): 2, ("DID", "test"): 2,
            ("DDN", "train"): 28, ("DDN", "test"): 14, ("SPA", "train"): 8, ("SPA", "test"): 2,
            ("RealInt", "test"): 2}


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("real") / "datasets")
    return root, build_real_tree(root)


def test_each_layout_pairs_with_its_real_naming(real_tree):
    root, _ = real_tree
    pairs = find_pairs(os.path.join(root, "Rain200H", "train"))
    assert {os.path.basename(r): os.path.basename(c) for r, c in pairs} == {
        f"norain-{i}x2.png": f"norain-{i}.png" for i in (1, 2, 3)}
    pairs = find_pairs(os.path.join(root, "Rain800", "test"))
    assert {os.path.basename(r): os.path.basename(c) for r, c in pairs} == {
        "rain-001.png": "norain-001.png", "rain-002.png": "norain-002.png"}
    # DDN: 14 rain variants per scene, all paired with the one clean image of their scene
    pairs = find_pairs(os.path.join(root, "DDN", "train"))
    per_clean = collections.Counter(os.path.basename(c) for _, c in pairs)
    assert per_clean == {"1.jpg": 14, "2.jpg": 14}
    assert all(os.path.basename(r).split("_")[0] + ".jpg" == os.path.basename(c) for r, c in pairs)
    # SPA's nested training tree: real_world/S/S-k/S-k_x_y.png -> real_world_gt/S/S_x_y.png
    scan = scan_folder(os.path.join(root, "spa"))
    assert scan.real and scan.layout == "SPA training" and len(scan.pairs) == 8
    for rain, clean in scan.pairs:
        scene, clip, name = rain.split(os.sep)[-3:]
        x, y = os.path.splitext(name)[0].split("_")[-2:]
        assert clip.startswith(scene + "-")
        assert clean == os.path.join(root, "spa", "real_world_gt", scene, f"{scene}_{x}_{y}.png")
    assert not scan.unpaired_rain and not scan.unpaired_clean
    # SPA test: rain/000.png -> gt/000gt.png
    pairs = find_pairs(os.path.join(root, "spa", "real_test_1000"))
    assert [(os.path.basename(r), os.path.basename(c)) for r, c in pairs] == [("000.png", "000gt.png"),
                                                                            ("001.png", "001gt.png")]
    assert scan_folder(os.path.join(root, "spa", "real_test_1000")).real


def test_rain200_as_downloaded_with_x2_folder(tmp_path):
    for i in (1, 2):
        _pair(str(tmp_path), f"rain/X2/norain-{i}x2.png", f"norain/norain-{i}.png", f"x2{i}")
    assert [(os.path.relpath(r, str(tmp_path)), os.path.basename(c)) for r, c in find_pairs(str(tmp_path))] == [
        (os.path.join("rain", "X2", "norain-1x2.png"), "norain-1.png"),
        (os.path.join("rain", "X2", "norain-2x2.png"), "norain-2.png")]


def test_spa_flat_ground_truth_and_missing_partner(tmp_path):
    # The flat real_world_gt/S_x_y.png is accepted as well as SPANet's per-scene folders.
    _pair(str(tmp_path), "real_world/007/007-3/007-3_5_6.png", "real_world_gt/007_5_6.png", "flat")
    _save(_arrays("lost")[0], str(tmp_path / "real_world/007/007-3/007-3_9_9.png"))
    scan = scan_folder(str(tmp_path))
    assert [os.path.basename(c) for _, c in scan.pairs] == ["007_5_6.png"]
    assert [os.path.basename(r) for r in scan.unpaired_rain] == ["007-3_9_9.png"]
    with pytest.raises(DataError, match="007-3_9_9.png has no clean partner"):
        find_pairs(str(tmp_path))


def test_layout_comes_from_contents_not_the_path(real_tree, tmp_path):
    root, _ = real_tree
    # SPA's tree under a synthetic-sounding name is still real rain; Rain200 naming under "spa_DID" is not.
    shutil.copytree(os.path.join(root, "spa"), tmp_path / "Rain200H_DID")
    shutil.copytree(os.path.join(root, "Rain200L", "train"), tmp_path / "spa_DID_Rain800")
    assert scan_folder(str(tmp_path / "Rain200H_DID")).real
    synthetic = scan_folder(str(tmp_path / "spa_DID_Rain800"))
    assert not synthetic.real and synthetic.rules == {"x2": 3}
    ds = MixedRainDataset([str(tmp_path / "spa_DID_Rain800"), str(tmp_path / "Rain200H_DID")], crop_size=16)
    assert len(ds.synthetic_pairs) == 3 and len(ds.real_pairs) == 8


def test_stacked_images_split_the_right_way_round(real_tree, tmp_path):
    root, _ = real_tree
    did_test = os.path.join(root, "DID", "test")
    with pytest.raises(DataError, match="prepare rain800\\|did"):
        find_pairs(did_test)  # DID and Rain800 name files alike: never guess the rainy half
    pairs = find_pairs(did_test, dataset_spec("DID").stacked_rain_half)
    assert len(pairs) == 2 and all(isinstance(r, StackedHalf) and r.half == "left" for r, _ in pairs)
    for rain_ref, clean_ref in pairs:
        rain, clean = read_pair(rain_ref, clean_ref)
        assert rain.shape == clean.shape == (3, H, W)
        assert float(rain.mean() - clean.mean()) > 0.8 * RAIN_LIFT / 255  # the left half is the rainy one
        torch.testing.assert_close(read_image(rain_ref), rain)
    # Rain800 as published by ID-CGAN: clean on the left, rain on the right
    _stacked(str(tmp_path / "test_syn" / "1.jpg"), "r800raw", "right")
    (rain_ref, clean_ref), = find_pairs(str(tmp_path / "test_syn"), dataset_spec("Rain800").stacked_rain_half)
    rain, clean = read_pair(rain_ref, clean_ref)
    assert float(rain.mean() - clean.mean()) > 0.8 * RAIN_LIFT / 255
    # stacked references survive pickling (DataLoader workers)
    import pickle

    again = pickle.loads(pickle.dumps(rain_ref))
    assert isinstance(again, StackedHalf) and again.half == "right" and str(again) == str(rain_ref)


def _raw_did(raw: str) -> list[str]:
    """DID-MDN-training/Rain_{Heavy,Medium,Light}/train2018new/{0,1}.jpg; returns the sources in merge order."""
    sources = []
    for density in ("Rain_Heavy", "Rain_Medium", "Rain_Light"):
        for i in (1, 0):  # written out of order: the merge sorts numerically
            _stacked(os.path.join(raw, density, "train2018new", f"{i}.jpg"), f"{density}{i}", "left")
        sources += [os.path.join(raw, density, "train2018new", f"{i}.jpg") for i in (0, 1)]
    return sources


def test_prepare_did_merges_densities_and_is_idempotent(tmp_path, capsys):
    raw, out = str(tmp_path / "DID-MDN-training"), str(tmp_path / "DID" / "train")
    sources = _raw_did(raw)
    assert dataset_cli.main(["prepare", "did", raw, out]) == 0
    assert "12 written, 0 unchanged" in capsys.readouterr().out
    for k, src in enumerate(sources, 1):  # heavy 0,1 then medium 0,1 then light 0,1 -> 1..6
        full = np.asarray(Image.open(src).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, "rain", f"{k}.png"))), full[:, :W])
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, "norain", f"{k}.png"))), full[:, W:])
    with open(os.path.join(out, "sources.csv")) as f:
        assert f.read().splitlines()[1].endswith(os.path.join("Rain_Heavy", "train2018new", "0.jpg"))
    assert len(find_pairs(out)) == 6
    assert prepare("did", raw, out, progress=False) == {"written": 0, "unchanged": 12, "overwritten": 0}
    # a different file where an output belongs is never overwritten silently
    _save(np.zeros((H, W, 3), np.uint8), os.path.join(out, "norain", "3.png"))
    with pytest.raises(DataError, match="3.png already exists and differs"):
        prepare("did", raw, out, progress=False)
    assert dataset_cli.main(["prepare", "did", raw, out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare("did", raw, out, overwrite=True, progress=False)["overwritten"] == 1


def test_prepare_rain800_right_half_is_rainy(tmp_path):
    raw, out = str(tmp_path / "training"), str(tmp_path / "Rain800" / "train")
    for i in (1, 2, 10):
        _stacked(os.path.join(raw, f"{i}.jpg"), f"r800{i}", "right")
    assert prepare("rain800", raw, out, progress=False)["written"] == 6
    pairs = find_pairs(out)
    assert [os.path.basename(r) for r, _ in pairs] == ["rain-001.png", "rain-002.png", "rain-010.png"]
    full = np.asarray(Image.open(os.path.join(raw, "10.jpg")).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "rain", "rain-010.png"))), full[:, W:])
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "norain", "norain-010.png"))), full[:, :W])
    _save(np.zeros((H, 2 * W + 1, 3), np.uint8), os.path.join(raw, "11.jpg"))
    with pytest.raises(DataError, match="11.jpg is not a side-by-side pair"):
        prepare("rain800", raw, out, progress=False)


def test_check_counts_and_reports_problems(real_tree, tmp_path, capsys):
    src, expected = real_tree
    root = str(tmp_path / "datasets")
    shutil.copytree(src, root)
    results = {(r.dataset, r.split): r for r in check_root(root, progress=False)}
    assert {k: r.pairs for k, r in results.items()} == expected
    assert not any(r.problems(ignore_counts=True) for r in results.values())
    assert results[("Rain200L", "train")].problems() == ["3 of 1800 expected"]
    assert dataset_cli.main(["check", root, "--ignore_counts"]) == 0
    assert dataset_cli.main(["check", root]) == 1
    assert "3 of 1800 expected" in capsys.readouterr().out
    # plant an unpaired rainy file, a stray clean file, a truncated image and a mis-sized pair
    _save(_arrays("stray")[0], os.path.join(root, "Rain200H/train/rain/norain-99x2.png"))
    _save(_arrays("stray")[1], os.path.join(root, "Rain800/test/norain/norain-050.png"))
    ddn_clean = os.path.join(root, "DDN/test/norain/901.jpg")
    with open(ddn_clean, "rb") as f:
        data = f.read()
    with open(ddn_clean, "wb") as f:
        f.write(data[: len(data) // 2])
    _save(np.zeros((H + 2, W, 3), np.uint8), os.path.join(root, "spa/real_test_1000/gt/001gt.png"))
    assert dataset_cli.main(["check", root, "--ignore_counts"]) == 1
    out = capsys.readouterr().out
    assert "norain-99x2.png" in out and "norain-050.png" in out and "901.jpg" in out and "001.png is 24x32" in out
    results = {(r.dataset, r.split): r for r in check_root(root, progress=False)}
    assert results[("DDN", "test")].problems(True) == ["1 unreadable"]  # one file, shared by 14 pairs
    assert results[("Rain200H", "train")].problems(True) == ["1 unpaired"]
    assert results[("SPA", "test")].problems(True) == ["1 mis-sized"]
    assert dataset_cli.main(["check", str(tmp_path / "empty")]) == 1
    # a stacked (unprepared) training set is readable for check but flagged: training needs prepare
    shutil.rmtree(os.path.join(root, "DID", "train"))
    shutil.copytree(os.path.join(root, "DID", "test"), os.path.join(root, "DID", "train"))
    did_train = {(r.dataset, r.split): r for r in check_root(root, progress=False)}[("DID", "train")]
    assert did_train.pairs == 2 and "prepare did" in did_train.problems(True)[0]


def test_spa_is_resampled_to_the_synthetic_count(real_tree):
    root, _ = real_tree
    syn = [os.path.join(root, "Rain200L", "train"), os.path.join(root, "Rain800", "train")]  # 3 + 2 pairs
    spa = os.path.join(root, "spa")  # 8 real pairs
    ds = MixedRainDataset(syn + [spa], crop_size=16)
    assert len(ds) == 10 and len(ds.real_pairs) == 8
    draws = []
    for epoch in range(6):
        pairs = ds.epoch_pairs(epoch, seed=3)
        assert len(ds) == len(pairs) == 10 and pairs[:5] == ds.synthetic_pairs
        real = pairs[5:]
        assert len(set(real)) == 5 and set(real) <= set(ds.real_pairs)  # without replacement
        assert all(s == spa for s in ds.epoch_sources(epoch, seed=3)[5:])
        draws.append(real)
    assert len({tuple(d) for d in draws}) > 1  # a new draw each epoch
    assert ds.epoch_pairs(2, seed=3)[5:] == draws[2]  # a function of (epoch, seed) only
    other = MixedRainDataset(syn + [spa], crop_size=16)
    assert other.epoch_pairs(2, seed=3) == ds.epoch_pairs(2, seed=3)
    assert len({tuple(other.epoch_pairs(0, seed)[5:]) for seed in range(5)}) > 1
    assert ds.pairs == ds.epoch_pairs(0, 0)  # what integer indices read
    # fewer real than synthetic pairs: all of them, every epoch; no real folder: the synthetic pairs
    many = MixedRainDataset([os.path.join(root, "DDN", "train"), os.path.join(root, "spa", "real_test_1000")], 16)
    assert len(many) == 30 and sorted(many.epoch_pairs(4, 1)[28:]) == sorted(many.real_pairs)
    plain = MixedRainDataset(syn, 16)
    assert plain.epoch_pairs(7, 1) == plain.synthetic_pairs and len(plain) == 5
    only_real = MixedRainDataset([spa], 16)
    assert sorted(only_real.epoch_pairs(3, 0)) == sorted(only_real.real_pairs)


def _corrupt_set(tmp_path) -> str:
    root = str(tmp_path / "set")
    for i in range(3):
        _pair(root, f"rain/{i}.png", f"norain/{i}.png", f"c{i}")
    with open(os.path.join(root, "rain", "1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_corrupt_image_is_skipped_or_strict(tmp_path, caplog):
    root = _corrupt_set(tmp_path)
    ds = MixedRainDataset([root], crop_size=16)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        item = ds[SampleKey(1, 5)]
    assert ds.skipped == 1 and "1.png" in caplog.text
    expected = MixedRainDataset([root], crop_size=16)[SampleKey(2, 5)]  # the next pair, same augmentation
    assert all(torch.equal(a, b) for a, b in zip(item, expected))
    strict = MixedRainDataset([root], crop_size=16, strict=True)
    with pytest.raises(DataError, match=r"rain.1\.png"):
        strict[SampleKey(1, 5)]


def test_skips_in_loader_workers_are_counted(tmp_path):
    from torch.utils.data import DataLoader

    ds = MixedRainDataset([_corrupt_set(tmp_path)], crop_size=16)
    loader = DataLoader(ds, batch_size=3, num_workers=1, sampler=[SampleKey(i, i) for i in range(3)])
    batch = next(iter(loader))
    assert batch[0].shape == (3, 3, 16, 16) and ds.skipped == 1


def test_dataset_specs_table():
    assert [s.name for s in datasets.DATASET_SPECS] == ["Rain200L", "Rain200H", "Rain800", "DID", "DDN", "SPA",
                                                          "RealInt"]
    assert dataset_spec("rain1400").name == "DDN" and dataset_spec("spa").name == "SPA"
    assert dataset_spec("DID").stacked_rain_half == "left" and dataset_spec("Rain800").stacked_rain_half == "right"
    with pytest.raises(DataError, match="choose from: Rain200L"):
        dataset_spec("Rain100X")
