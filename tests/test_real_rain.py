"""Scoring real rain in test_model.py: NIQE where there is no ground truth, mixed tables, reuse on rerun."""
import csv
import os

import numpy as np
import pytest
import skimage.data
import torch

import test_model
from models import build_model
from utils.checkpoint import save_atomic
from utils.data.demo import add_rain
from utils.eval import evaluation
from utils.images import read_image, save_image
from utils.niqe import niqe


def _photo(name: str, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = getattr(skimage.data, name)()[:h, :w].astype(np.float64) / 255
    rainy = add_rain(clean, "heavy", np.random.default_rng(seed))
    return (torch.from_numpy(rainy).permute(2, 0, 1).float(), torch.from_numpy(clean).permute(2, 0, 1).float())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for i, (name, h, w) in enumerate([("chelsea", 200, 240), ("coffee", 210, 200)], start=1):
        rainy, clean = _photo(name, h, w, i)
        save_image(rainy, str(root / f"Rain200L/test/rain/norain-{i}x2.png"))
        save_image(clean, str(root / f"Rain200L/test/norain/norain-{i}.png"))
    for i, (name, h, w) in enumerate([("astronaut", 200, 220), ("rocket", 196, 260)], start=1):
        save_image(_photo(name, h, w, 10 + i)[0], str(root / f"RealInt/{i}.png"))
    save_image(torch.rand(3, 64, 64), str(root / "RealInt/tiny.png"))  # too small for NIQE
    torch.manual_seed(0)
    ckpt = str(root / "brn.pth")
    save_atomic({"model": build_model("BRN", inter_iter=1, dim_in=0).state_dict(), "model_name": "BRN",
                     "model_hparams": {"inter_iter": 1, "dim_in": 0}}, ckpt)
    return str(root), ckpt


def _smooth(model, x, z=None, **tiling):
    """A stand-in derainer (3 x 3 box blur): outputs with texture, whatever the untrained model does."""
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


@pytest.fixture
def derain_by_blur(monkeypatch):
    monkeypatch.setattr(evaluation, "restore", _smooth)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_mixed_table_scores_each_set_by_what_it_has(setup, tmp_path, capsys, derain_by_blur):
    root, ckpt = setup
    out = tmp_path / "out"
    assert test_model.main(["--test_model", ckpt, "--testset", "Rain200L,RealInt", "--data_root", root,
                            "--save_path", str(out)]) == 0
    summary = {r["dataset"]: r for r in _csv(out / "summary.csv")}
    assert summary["Rain200L"]["psnr"] and not summary["Rain200L"]["niqe_out"]  # default: by reference
    assert not summary["RealInt"]["psnr"] and summary["RealInt"]["niqe_out"]  # no ground truth: NIQE
    rows = {r["name"]: r for r in _csv(out / "RealInt" / "results.csv")}
    assert rows["tiny.png"]["niqe_out"] == "" and rows["tiny.png"]["niqe_rain"] == ""
    for i in (1, 2):
        row = rows[f"{i}.png"]
        assert float(row["niqe_rain"]) == pytest.approx(niqe(read_image(os.path.join(root, f"RealInt/{i}.png"))),
                                                        abs=1e-4)
        assert float(row["niqe_out"]) == pytest.approx(niqe(read_image(str(out / "RealInt" / f"{i}.png"))),
                                                       abs=1e-4)
    rain = [float(rows[f"{i}.png"]["niqe_rain"]) for i in (1, 2)]
    derained = [float(rows[f"{i}.png"]["niqe_out"]) for i in (1, 2)]
    assert float(summary["RealInt"]["niqe_rain"]) == pytest.approx(np.mean(rain), abs=1e-4)
    assert float(summary["RealInt"]["niqe_change"]) == pytest.approx(np.mean(derained) - np.mean(rain), abs=2e-4)
    assert "Mean" not in summary  # one set per kind of score: nothing to average
    md = (out / "summary.md").read_text()
    assert "NIQE: MATLAB niqe_release" in md and "| RealInt | 3 | — | — |" in md
    better = min(float(summary["RealInt"]["niqe_rain"]), float(summary["RealInt"]["niqe_out"]))
    assert f"**{better:.3f}**" in md  # the better NIQE (lower) is marked
    assert "| Rain200L | 2 |" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "NIQE (rainy)" in page and "NIQE: MATLAB niqe_release" in page
    for r in rows.values():  # every NIQE of the page's images, as the registry's digits show it
        for key in ("niqe_rain", "niqe_out"):
            assert r[key] == "" or f"{float(r[key]):.3f}" in page


def test_all_metrics_on_pairs_and_rerun_reuses_niqe(setup, tmp_path, monkeypatch, capsys, derain_by_blur):
    root, ckpt = setup
    out = str(tmp_path / "pairs")
    argv = ["--test_model", ckpt, "--test_dir", os.path.join(root, "Rain200L", "test"), "--save_path", out,
            "--metrics", "psnr,ssim,niqe"]
    assert test_model.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _csv(os.path.join(out, "results.csv"))
    assert all(r["psnr"] and r["ssim"] and r["niqe_rain"] and r["niqe_out"] and r["niqe_channel"] == "y" for r in rows)
    assert "Avg. psnr" in printed and "Avg. niqe: rainy" in printed
    calls = []
    monkeypatch.setattr(evaluation, "niqe", lambda *a: calls.append(a) or 0.0)
    assert test_model.main(argv + ["--skip_existing"]) == 0
    assert calls == [] and _csv(os.path.join(out, "results.csv")) == rows  # scores reused, none recomputed
    assert test_model.main(argv + ["--skip_existing", "--niqe_channel", "gray"]) == 0
    assert len(calls) == 2 * len(rows)  # another channel: rainy and derained NIQE again, for every image


def test_bad_metric_names_fail_in_one_line(setup, capsys):
    root, ckpt = setup
    assert test_model.main(["--test_model", ckpt, "--test_dir", root, "--metrics", "psnr,lpips"]) == 2
    err = capsys.readouterr().err
    assert "--metrics" in err and "choose from: psnr, ssim, niqe" in err and "Traceback" not in err


def test_flat_output_has_no_niqe_and_says_why(setup, tmp_path, caplog):
    root, ckpt = setup  # the untrained model's output is clamped to a flat black image
    with caplog.at_level("WARNING", logger="coic"):
        assert test_model.main(["--test_model", ckpt, "--testset", "RealInt", "--data_root", root,
                                "--save_path", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in _csv(tmp_path / "RealInt" / "results.csv")}
    assert rows["1.png"]["niqe_rain"] and rows["1.png"]["niqe_out"] == ""
    assert "undefined" in caplog.text and "flat" in caplog.text
