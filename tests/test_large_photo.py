"""benchmarks/large_photo.py: the real test_model.py run it measures, its stop after K forwards, and
the extrapolation and table it reports (checked against arithmetic done by hand)."""

import pytest
import torch

from benchmarks import large_photo
from models import build_encoder, build_model
from utils.checkpoint import save_atomic
from utils.images import read_image

TINY_IDT = {"img_size": 64, "embed_dim": 8}  # tiles of 64: tiled at any photo size, fast


@pytest.fixture
def tiny_run(tmp_path):
    torch.manual_seed(0)
    ckpt = str(tmp_path / "idt.pth")
    save_atomic({"model_name": "IDT", "model_hparams": TINY_IDT, "model": build_model("IDT", **TINY_IDT).state_dict(),
                 "encoder": build_encoder(dim=128).state_dict(), "encoder_hparams": {"dim": 128}}, ckpt)
    photos = tmp_path / "photos"
    photos.mkdir()

    def request(width, height, max_forwards, precision="auto"):
        large_photo.make_photo(str(photos / "p.png"), width, height)
        return {"model": "IDT", "checkpoint": ckpt, "photos": str(photos), "out": str(tmp_path / "out"),
                "threads": 1, "max_memory": "8G", "max_forwards": max_forwards, "precision": precision}

    return request


def _tiles(size, tile=64, overlap=32):
    """Tile starts along one side, counted by hand: every stride, then one flush with the end."""
    if size <= tile:
        return 1
    n, start = 0, 0
    while start < size - tile:
        n, start = n + 1, start + tile - overlap
    return n + 1


def test_photo_has_the_asked_size_and_streaks(tmp_path):
    large_photo.make_photo(str(tmp_path / "p.png"), 120, 90)
    img = read_image(str(tmp_path / "p.png"))
    assert tuple(img.shape) == (3, 90, 120)
    assert img.max() > 0.95 and 0.1 < img.mean() < 0.9  # bright streaks over a mid-grey field


def test_measure_stops_after_k_forwards_and_counts_the_whole_plan(tiny_run):
    result = large_photo._call("--measure", tiny_run(300, 200, 3))
    assert result["rc"] == 0 and result["stopped"]
    assert len(result["forwards"]) == 3 and len(result["cpu_forwards"]) == 3
    assert result["total_forwards"] == _tiles(300) * _tiles(200) == 9 * 6  # one tile per forward on a CPU
    assert result["plans"][0]["tile"] == 64 and result["plans"][0]["batch"] == 1
    assert result["plans"][0]["budget_mib"] == 8 * 1024
    assert 100 < result["peak_mib"] < 8 * 1024  # a real high-water mark of a process that loaded torch
    row = large_photo.summarise(result)
    assert row["extrapolated"] and row["forwards"] == 54 and row["within_budget"]
    assert row["seconds"] > result["to_first_forward"]


def test_full_run_writes_the_output_and_times_every_forward(tiny_run, tmp_path):
    result = large_photo._call("--measure", tiny_run(100, 70, 0))
    assert result["rc"] == 0 and not result["stopped"]
    assert len(result["forwards"]) == result["total_forwards"] == _tiles(100) * _tiles(70) == 3 * 2
    assert tuple(read_image(str(tmp_path / "out" / "p.png")).shape) == (3, 70, 100)
    row = large_photo.summarise(result)
    assert not row["extrapolated"] and row["seconds"] == result["seconds"]


def test_summarise_extrapolates_from_the_median_forward():
    result = {"model": "BRN", "rc": 0, "stopped": True, "seconds": 99.0, "forwards": [2.0, 4.0, 3.0],
              "cpu_forwards": [1.0, 1.0, 5.0], "total_forwards": 10, "to_first_forward": 5.0, "peak_mib": 3000.0,
              "setting": "fp32", "plans": [{"tile": 656, "batch": 1, "estimate_mib": 3900.0, "budget_mib": 4096.0}]}
    row = large_photo.summarise(result)
    assert row["seconds"] == 5.0 + 3.0 * 10 and row["seconds_per_forward"] == 3.0 and row["cpu_per_forward"] == 1.0
    assert row["within_budget"] and row["measured_forwards"] == 3
    over = large_photo.summarise(dict(result, peak_mib=4097.0))
    assert not over["within_budget"]
    text = large_photo.markdown([row, over], "header")
    assert "| BRN | fp32 | 656² tiles, 1 per forward | 10 | 3900 | 3000 | 4096 | yes | 35 (extrapolated from 3) | 3.0 (1.0) |" \
        in text
    assert "| 4097 | 4096 | **no** |" in text


@pytest.mark.parametrize("precision, setting", [
    ("fp32", "fp32"),
    pytest.param("bf16", "bf16 + channels_last", marks=pytest.mark.slow),  # 11 s: `pytest -m ""` and CI
])
def test_measure_passes_the_precision_to_test_model(tiny_run, monkeypatch, precision, setting):
    monkeypatch.setenv("COIC_CPU_FLAGS", "fpu avx2")  # no native bf16: the default would be fp32
    result = large_photo._call("--measure", tiny_run(100, 70, 1, precision))
    assert result["rc"] == 0 and result["setting"] == setting
    assert large_photo.summarise(result)["setting"] == setting


def test_bad_size_is_one_line(capsys):
    assert large_photo.main(["--size", "big", "--models", "BRN"]) == 2
    assert "--size 'big'" in capsys.readouterr().err
