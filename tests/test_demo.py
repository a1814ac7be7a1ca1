import os

import numpy as np
import pytest
import torch

from datasets import find_pairs, read_image
from utils.data.demo import RAIN_TYPES, add_rain
from utils.metrics import psnr
from utils.train.run import main


def test_demo_layout_and_rain_types_differ(tiny_demo):
    levels = {}
    for kind in RAIN_TYPES:
        for split, count in (("train", 8), ("val", 8), ("test", 4)):
            assert len(find_pairs(os.path.join(tiny_demo, kind, split))) == count
        pairs = find_pairs(os.path.join(tiny_demo, kind, "train"))
        levels[kind] = np.mean([psnr(read_image(r), read_image(c)) for r, c in pairs])
    assert levels["light"] > levels["multiangle"] and levels["light"] > levels["heavy"] + 5
    clean = np.full((48, 48, 3), 0.3, np.float32)
    hazy = add_rain(clean, "hazy", np.random.default_rng(0))
    assert hazy.min() > 0.3  # the veil lifts every pixel
    a = add_rain(clean, "heavy", np.random.default_rng(1))
    assert np.array_equal(a, add_rain(clean, "heavy", np.random.default_rng(1)))


def test_every_scene_is_rendered_under_every_rain_type(tiny_demo):
    """The same clean picture under the same name in each type's folder, in every split (so the probe
    can compare one scene under two rains); the val split holds other crops than train."""
    for split, count in (("train", 8), ("val", 8), ("test", 4)):
        pairs = {kind: find_pairs(os.path.join(tiny_demo, kind, split)) for kind in RAIN_TYPES}
        assert all(len(p) == count for p in pairs.values())
        for i in range(count):
            names = {os.path.basename(pairs[kind][i][0]) for kind in RAIN_TYPES}
            assert len(names) == 1
            cleans = [read_image(pairs[kind][i][1]) for kind in RAIN_TYPES]
            assert all(torch.equal(c, cleans[0]) for c in cleans[1:])
            rainy = [read_image(pairs[kind][i][0]) for kind in RAIN_TYPES]
            assert not torch.equal(rainy[0], rainy[1])  # different rain on the same scene
    train = {read_image(c).shape for _, c in find_pairs(os.path.join(tiny_demo, "light", "train"))}
    val = {read_image(c).shape for _, c in find_pairs(os.path.join(tiny_demo, "light", "val"))}
    assert train == {(3, 32, 32)} and val == {(3, 40, 40)}  # val at the test size


def test_an_older_demo_folder_is_rebuilt(tmp_path):
    import json

    from utils.data.demo import DATA_VERSION, build_demo_data

    root = tmp_path / "demo_data"
    build_demo_data(str(root), train_per_source=1, train_size=16, test_size=16)
    marker = root / ".complete"
    settings = json.loads(marker.read_text())
    assert settings["version"] == DATA_VERSION
    settings["version"] = DATA_VERSION - 1
    marker.write_text(json.dumps(settings))
    (root / "light" / "val" / "rain" / "000.png").unlink()
    build_demo_data(str(root), train_per_source=1, train_size=16, test_size=16)
    assert (root / "light" / "val" / "rain" / "000.png").is_file()
    assert json.loads(marker.read_text())["version"] == DATA_VERSION


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
    assert "z names the rain type of" in out and "an untrained encoder" in out
    assert "fitted on the other val scenes" in out
    # the colour error column, by hand: the largest |mean error| of one channel over the type's pictures
    worst = 0.0
    for rain, clean in find_pairs(os.path.join(tiny_demo, "heavy", "test")):
        name = os.path.splitext(os.path.basename(rain))[0] + ".png"
        derained = read_image(os.path.join(save, "demo_results", "heavy", name))
        worst = max(worst, float((derained - read_image(clean)).mean(dim=(1, 2)).abs().max()))
    heavy = next(line for line in out.splitlines() if line.startswith("heavy"))
    assert float(heavy.split()[-1]) == pytest.approx(worst, abs=1e-3)


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


def _row(kind: str, rain_psnr: float, out_psnr: float) -> dict:
    return {"type": kind, "rain_psnr": rain_psnr, "rain_ssim": 0.5, "out_psnr": out_psnr, "out_ssim": 0.6,
            "rain_niqe": None, "out_niqe": None, "picture": f"demo_{kind}.png"}


def test_demo_table_explains_a_type_made_worse(capsys):
    """A type whose derained PSNR is below the rainy input gets one line saying why and what to try;
    the mean row is the plain mean of the rows; a backbone without published weights gets no
    --pretrained advice."""
    from utils.train.run import print_demo_table

    print_demo_table([_row("light", 26.0, 24.5), _row("heavy", 14.0, 20.0)], "BRN")
    out = capsys.readouterr().out.splitlines()
    mean = next(line for line in out if line.startswith("mean"))
    assert mean.split()[1:4] == ["20.00/0.5000", "22.25/0.6000", "+2.25"]
    hints = [line for line in out if "below the rainy input" in line]
    assert len(hints) == 1 and hints[0].startswith("light: derained 1.50 dB below")
    assert "docs/demo.md" in hints[0] and "train_BRN.py --demo --pretrained baseline-brn" in hints[0]

    print_demo_table([_row("light", 26.0, 27.0), _row("heavy", 14.0, 20.0)], "BRN")
    assert "below the rainy input" not in capsys.readouterr().out
    print_demo_table([_row("light", 26.0, 25.0)], "IDT")
    hint = [line for line in capsys.readouterr().out.splitlines() if "below the rainy input" in line]
    assert len(hint) == 1 and "--pretrained" not in hint[0]


def test_most_even_keeps_the_checkpoint_whose_worst_set_gains_most():
    from utils.train.selection import most_even

    gains = {
        "a": {"light": -3.0, "heavy": 9.0},   # best mean (+3.0), worst set -3.0
        "b": {"light": 0.5, "heavy": 2.0},    # worst set +0.5: the choice
        "c": {"light": 0.2, "heavy": 6.0},
    }
    assert most_even(gains) == "b"
    assert most_even({**gains, "d": {"light": 0.5, "heavy": 1.0}}) == "d"  # a tie goes to the later one
    with pytest.raises(ValueError):
        most_even({})


@pytest.mark.slow  # end to end, 15 s: `pytest -m ""` and CI run it
def test_demo_evaluates_the_checkpoint_whose_worst_type_gains_most(tmp_path, tiny_demo, capsys):
    """With a checkpoint saved at every CoIC iteration, the demo evaluates the one whose worst rain type
    gains most on 4 pictures of each type's val split, and keeps only it and the last one. Each gain
    is checked against the evaluation path's PSNR of the derained picture minus the rainy picture's
    PSNR, computed here."""
    from types import SimpleNamespace

    from utils.eval.evaluation import evaluate, load_encoder, load_model
    from utils.train.run import demo_checkpoint
    from utils.train.selection import checkpoint_gains, validation_pairs

    save = str(tmp_path / "demo")
    folders = {kind: os.path.join(tiny_demo, kind, "train") for kind in RAIN_TYPES}
    assert main("BRN", ["--data_paths", ",".join(folders.values()), "--save_path", save, "--tot_iters", "5",
                        "--stage1_iters", "2", "--save_freq", "1", "--keep_checkpoints", "10", "--crop_size", "16",
                        "--batch_size", "2", "--inter_iter", "1", "--num_workers", "0"]) == 0
    pairs = validation_pairs({kind: os.path.join(tiny_demo, kind, "val") for kind in RAIN_TYPES}, 4)
    assert all(len(p) == 4 for p in pairs.values())
    cpu = torch.device("cpu")
    worst = {}
    for it in range(2, 6):
        path = os.path.join(save, f"ckpt_{it:07d}.pth")
        model, ckpt = load_model("BRN", path, "tran", cpu)
        encoder = load_encoder(None, ckpt, path, cpu)
        by_hand = {}
        for kind, items in pairs.items():
            rows = evaluate(model, encoder, list(items), None, cpu, progress=False, metrics=("psnr",))
            by_hand[kind] = np.mean([row["psnr"] - psnr(read_image(r), read_image(c))
                                     for row, (r, c) in zip(rows, items)])
        got = checkpoint_gains(path, "BRN", pairs, cpu)
        assert got == pytest.approx(by_hand, abs=1e-4)
        worst[it] = min(by_hand.values())
    best = max(sorted(worst), key=lambda it: (worst[it], it))
    last = os.path.join(save, "ckpt_0000005.pth")
    args = SimpleNamespace(save_path=save, stage1_iters=2, tot_iters=5)
    capsys.readouterr()
    chosen = demo_checkpoint(last, "BRN", tiny_demo, args, cpu)
    assert os.path.basename(chosen) == f"ckpt_{best:07d}.pth"
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("evaluating "))
    assert line.startswith(f"evaluating ckpt_{best:07d}.pth: of the 4 checkpoints since CoIC started")  # 2, 3, 4, 5
    assert f"({worst[best]:+.2f} dB; the last one's worst: {worst[5]:+.2f} dB)" in line
    # stage 1 (iterations 0 and 1) is never a candidate; of 2-5 the choice and the last stay
    left = sorted(f for f in os.listdir(save) if f.startswith("ckpt_"))
    assert left == sorted({"ckpt_0000000.pth", "ckpt_0000001.pth", os.path.basename(chosen), "ckpt_0000005.pth"})
    # a rerun chooses the same one from what is left
    assert demo_checkpoint(last, "BRN", tiny_demo, args, cpu) == chosen
