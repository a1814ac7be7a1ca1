import csv
import math
import os
import shutil

import pytest
import torch
from helpers import reference_file

import test_model
from datasets import read_image
from models import build_model
from utils.eval import evaluation
from utils.eval.inference import restore


@pytest.fixture
def trained(tiny_run):
    """The suite's tiny CoIC BRN run (conftest.py), read only."""
    return tiny_run


def _y(img):
    """Y on 0-255 of the coic protocol (BT.601, as Restormer's evaluation), float64."""
    r, g, b = (c.double() * 255 for c in img)
    return 16 + 0.256789 * r + 0.504129 * g + 0.097906 * b


def _hand_psnr_y(x, y):
    mse = float(((_y(x) - _y(y)) ** 2).mean())
    return 10 * math.log10(255 ** 2 / mse)


def _skimage_ssim_y(x, y):
    from skimage.metrics import structural_similarity

    return structural_similarity(_y(x).numpy(), _y(y).numpy(), data_range=255, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)


def _rows(path):
    with open(os.path.join(path, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_tiled_restore_close_to_whole_image():
    torch.manual_seed(0)
    model = build_model("BRN", inter_iter=1).eval()
    x = torch.rand(1, 3, 60, 75)
    whole = restore(model, x)
    tiled = restore(model, x, tile=48, overlap=24)
    assert tiled.shape == whole.shape
    # a conv net with a limited receptive field: tiles blended with overlap differ only near seams
    # (observed 5.7e-5; flat blending weights give 3.7e-4)
    assert float((tiled - whole).abs().mean()) < 2e-4


def test_with_ground_truth_both_modes(tmp_path, trained, tiny_demo):
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    for mode in ("normal", "tran"):
        out = str(tmp_path / mode)
        assert test_model.main(["--test_model", trained, "--model_name", "BRN", "--load_mode", mode,
                                "--test_dir", test_dir, "--save_path", out, "--tile", "32",
                                "--tile_overlap", "8"]) == 0
        rows = _rows(out)
        assert len(rows) == 4
        for r in rows:
            img = read_image(os.path.join(out, r["name"]))
            assert img.shape == (3, 40, 40)  # larger than the 32 tile: tiled and blended back
            # the scores, recomputed by hand from the saved 8-bit PNG and the clean image
            clean = read_image(os.path.join(test_dir, "norain", r["name"]))
            assert float(r["psnr"]) == pytest.approx(_hand_psnr_y(img, clean), abs=0.05)
            assert float(r["ssim"]) == pytest.approx(_skimage_ssim_y(img, clean), abs=0.005)


def test_without_ground_truth_and_separate_encoder(tmp_path, trained, tiny_demo, capsys):
    folder = tmp_path / "rainy"
    shutil.copytree(os.path.join(tiny_demo, "light", "test", "rain"), folder)
    out = str(tmp_path / "out")
    assert test_model.main(["--test_model", trained, "--feat_ext", trained, "--load_mode", "tran",
                            "--test_dir", str(folder), "--save_path", out]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["psnr"] == "" for r in rows)
    assert "Avg. psnr" not in capsys.readouterr().out


def test_clear_errors(tmp_path, trained, tiny_demo, capsys):
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    assert test_model.main(["--test_model", trained, "--model_name", "Nope", "--test_dir", test_dir,
                            "--save_path", str(tmp_path)]) == 2
    assert "unknown --model_name" in capsys.readouterr().err
    assert test_model.main(["--test_model", trained, "--model_name", "RCDNet", "--test_dir", test_dir,
                            "--save_path", str(tmp_path)]) == 2
    assert "not RCDNet" in capsys.readouterr().err
    assert test_model.main(["--test_model", str(tmp_path / "missing.pth"), "--test_dir", test_dir,
                            "--save_path", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_official_baseline_and_coic_files_evaluate(tmp_path, tiny_demo):
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    assert test_model.main(["--test_model", reference_file("brn_baseline_official.pth"), "--model_name", "BRN",
                            "--load_mode", "normal", "--test_dir", test_dir, "--save_path", str(tmp_path / "b")]) == 0
    assert len(_rows(str(tmp_path / "b"))) == 4
    # the published CoIC file has no encoder beside it: tran mode must say so
    assert test_model.main(["--test_model", reference_file("brn_coic_official.pth"), "--load_mode", "tran",
                            "--test_dir", test_dir, "--save_path", str(tmp_path / "c")]) == 2


def test_bf16_channels_last_evaluation_is_close_to_fp32(tmp_path, trained, tiny_demo):
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    runs = {"fp32": [], "bf16": ["--amp", "bf16", "--channels_last"]}
    for label, flags in runs.items():
        assert test_model.main(["--test_model", trained, "--load_mode", "tran", "--test_dir", test_dir,
                                "--save_path", str(tmp_path / label)] + flags) == 0
    fp32, bf16 = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert [r["name"] for r in fp32] == [r["name"] for r in bf16]
    for a, b in zip(fp32, bf16):
        assert abs(float(a["psnr"]) - float(b["psnr"])) < 0.3, (a, b)
    # bf16 really ran: some output pixel differs from the fp32 one
    assert any(not torch.equal(read_image(str(tmp_path / "fp32" / r["name"])),
                               read_image(str(tmp_path / "bf16" / r["name"]))) for r in fp32)


def test_read_ahead_keeps_order_and_reads_each_image_once(tmp_path, trained, tiny_demo, monkeypatch):
    items = test_model.collect_inputs(os.path.join(tiny_demo, "heavy", "test"))
    model, _ = test_model.load_model("BRN", trained, "normal", torch.device("cpu"))
    reads = []
    real = evaluation.read_pair
    monkeypatch.setattr(evaluation, "read_pair", lambda a, b, **kw: (reads.append(a), real(a, b, **kw))[1])
    out = tmp_path / "out"
    out.mkdir()
    first = test_model.evaluate(model, None, items, str(out), torch.device("cpu"), progress=False)
    os.remove(out / first[0]["name"])  # only the first image is left to derain: the others are not read
    reads.clear()
    again = test_model.evaluate(model, None, items, str(out), torch.device("cpu"), progress=False,
                                skip_existing=True)
    assert reads == [items[0][0]]
    assert [r["name"] for r in again] == [r["name"] for r in first]
    assert [r["psnr"] for r in again] == pytest.approx([r["psnr"] for r in first], abs=0.05)
    assert [p.name for p in sorted(out.iterdir())] == sorted(r["name"] for r in first)


def _photos(tmp_path, tiny_demo, names=("a.png", "b.png", "c.png")):
    """Three rainy photos (copies of the demo's), a folder of them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    src = sorted(os.listdir(os.path.join(tiny_demo, "light", "test", "rain")))
    for name, s in zip(names, src):
        shutil.copy(os.path.join(tiny_demo, "light", "test", "rain", s), folder / name)
    return folder


def test_a_single_photo_a_list_and_a_glob(tmp_path, trained, tiny_demo):
    folder = _photos(tmp_path, tiny_demo)
    (folder / "notes.txt").write_text("not an image")
    runs = {"one": [str(folder / "b.png")], "list": [str(folder / "c.png"), str(folder / "a.png")],
            "glob": [str(folder / "*.png")]}
    expected = {"one": ["b.png"], "list": ["c.png", "a.png"], "glob": ["a.png", "b.png", "c.png"]}
    for key, entries in runs.items():
        out = tmp_path / key
        assert test_model.main(["--test_model", trained, "--test_dir", *entries, "--save_path", str(out)]) == 0
        assert [r["name"] for r in _rows(out)] == expected[key]
        assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(expected[key])
        assert (out / "index.html").is_file()


def test_photo_inputs_that_cannot_be_used_are_one_line(tmp_path, trained, tiny_demo, capsys):
    folder = _photos(tmp_path, tiny_demo)
    (folder / "notes.txt").write_text("not an image")
    other = _photos(tmp_path / "x", tiny_demo) if (tmp_path / "x").mkdir() is None else None
    cases = [([str(folder / "*.jpg")], "matches no file"), ([str(folder / "notes.txt")], "not an image"),
             ([str(folder / "a.png"), str(other / "a.png")], "would both be saved as a.png"),
             ([str(folder / "nope.png")], "does not exist")]
    for entries, message in cases:
        assert test_model.main(["--test_model", trained, "--test_dir", *entries, "--save_path",
                                str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --test_dir") and message in err[-1], err


def test_unreadable_photos_are_listed_and_the_others_derained(tmp_path, trained, tiny_demo, capsys):
    folder = _photos(tmp_path, tiny_demo, names=("a.png", "c.png", "e.png"))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "d.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert test_model.main(["--test_model", trained, "--test_dir", str(folder), "--save_path", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 2 image(s) could not be read") and "b.png" in err[-1] and "d.jpg" in err[-1]
    rows = {r["name"]: r for r in _rows(out)}
    assert list(rows) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert [n for n, r in rows.items() if r["error"]] == ["b.png", "d.png"]
    assert "cannot read image" in rows["b.png"]["error"] and not rows["a.png"]["error"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["a.png", "c.png", "e.png"]
    assert "b.png" not in (out / "index.html").read_text()
    # --strict stops at the first
    strict = tmp_path / "strict"
    assert test_model.main(["--test_model", trained, "--test_dir", str(folder), "--save_path", str(strict),
                            "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "b.png" in err[-1] and "d.jpg" not in err[-1]
    assert not (strict / "c.png").exists()


@pytest.mark.slow  # TorchInductor builds C++ kernels: a minute or more of CPU on a cold cache
def test_compiled_backbone_gives_the_eager_output_with_one_graph(tmp_path, trained, tiny_demo):
    """--compile: the same PNGs as the eager run, and one graph for every tile of every image."""
    import torch._dynamo

    from utils.eval.inference import _cpp_compiler

    if _cpp_compiler() is None:
        pytest.skip("no C++ compiler for TorchInductor here (test_compile_without_a_compiler_is_one_line covers it)")
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    outputs = {}
    for extra in ([], ["--compile"]):
        out = tmp_path / ("compiled" if extra else "eager")
        assert test_model.main(["--test_model", trained, "--load_mode", "tran", "--test_dir", test_dir,
                                "--save_path", str(out), "--tile", "32", "--tile_overlap", "8", *extra]) == 0
        outputs[bool(extra)] = {r["name"]: read_image(str(out / r["name"])) for r in _rows(str(out))}
    assert len(outputs[True]) == 4 and outputs[True].keys() == outputs[False].keys()
    for name, img in outputs[True].items():  # 8-bit PNGs: at most one level apart
        assert float((img - outputs[False][name]).abs().max()) <= 1 / 255 + 1e-6, name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # 4 images x 4 tiles of 32 px
    assert "Setting: fp32, compiled; tiles of 32 px" in (tmp_path / "compiled" / "index.html").read_text()
    torch._dynamo.reset()


def test_compile_without_a_compiler_is_one_line(tmp_path, trained, tiny_demo, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ to be found
    monkeypatch.delenv("CXX", raising=False)
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    assert test_model.main(["--test_model", trained, "--test_dir", test_dir, "--save_path", str(tmp_path / "o"),
                            "--compile"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--compile needs a C++ compiler" in errors[0], errors


def test_the_report_says_which_model_made_it(tmp_path, trained, tiny_demo):
    from utils.eval.report import project_commit

    folder = _photos(tmp_path, tiny_demo)
    pages = {}
    for mode, extra in (("normal", ["--tile", "32", "--tile_overlap", "8"]), ("tran", [])):
        out = tmp_path / mode
        assert test_model.main(["--test_model", trained, "--load_mode", mode, "--test_dir", str(folder),
                                "--save_path", str(out), *extra]) == 0
        pages[mode] = (out / "index.html").read_text()
    commit = project_commit()
    assert commit != "" and f"project commit {commit}" in pages["normal"]
    assert f"Model: {trained} (BRN, plain (no modulation))" in pages["normal"]
    assert "(BRN, CoIC (modulated by the encoder&#x27;s z))" in pages["tran"]
    assert "Setting: fp32; tiles of 32 px, overlap 8 px" in pages["normal"]
    assert "Setting: fp32; whole images, or the largest tiles that fit" in pages["tran"]
    assert f"<title>CoIC deraining report: {os.path.basename(trained)}" in pages["normal"]
