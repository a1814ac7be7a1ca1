import os

import numpy as np

from datasets import find_pairs, read_image
from utils.data.demo import RAIN_TYPES, add_rain
from utils.metrics import psnr
from utils.train.run import main


def test_demo_layout_and_rain_types_differ(tiny_demo):
    levels = {}
    for kind in RAIN_TYPES:
        for split, count in (("train", 8), ("test", 4)):
            assert len(find_pairs(os.path.join(tiny_demo, kind, split))) == count
        pairs = find_pairs(os.path.join(tiny_demo, kind, "train"))
        levels[kind] = np.mean([psnr(read_image(r), read_image(c)) for r, c in pairs])
    assert levels["light"] > levels["multiangle"] and levels["light"] > levels["heavy"] + 5
    clean = np.full((48, 48, 3), 0.3, np.float32)
    hazy = add_rain(clean, "hazy", np.random.default_rng(0))
    assert hazy.min() > 0.3  # the veil lifts every pixel
    a = add_rain(clean, "heavy", np.random.default_rng(1))
    assert np.array_equal(a, add_rain(clean, "heavy", np.random.default_rng(1)))


def test_demo_command_trains_and_reports(tmp_path, tiny_demo, monkeypatch, capsys):
    monkeypatch.setenv("COIC_DEMO_ROOT", tiny_demo)
    save = str(tmp_path / "demo")
    assert main("BRN", ["--demo", "--save_path", save, "--tot_iters", "4", "--stage1_iters", "2",
                        "--crop_size", "16", "--batch_size", "2", "--inter_iter", "1", "--num_workers", "0"]) == 0
    out = capsys.readouterr().out
    for kind in RAIN_TYPES:
        assert kind in out and os.path.isfile(os.path.join(save, f"demo_{kind}.png"))
    assert "mean" in out
    picture = read_image(os.path.join(save, "demo_heavy.png"))
    assert picture.shape == (3, 40, 120)  # rainy | derained | clean


def test_demo_keeps_typed_data_paths(tmp_path, tiny_demo, monkeypatch):
    """--demo fills in the demo's training splits only when --data_paths is not typed."""
    monkeypatch.setenv("COIC_DEMO_ROOT", tiny_demo)
    save = tmp_path / "light_only"
    light = os.path.join(tiny_demo, "light", "train")
    assert main("BRN", ["--demo", "--save_path", str(save), "--data_paths", light, "--tot_iters", "2",
                        "--stage1_iters", "1", "--crop_size", "16", "--batch_size", "2", "--inter_iter", "1",
                        "--num_workers", "0"]) == 0
    log = (save / "train.log").read_text()
    assert "BRN: 8 training pairs" in log  # light's 8, not the four types' 32
    assert "heavy" not in log.split("training pairs")[0]
