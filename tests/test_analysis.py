"""Analysis tools: the math on hand-made inputs, and one CLI run per tool on the tiny demo data."""
import csv
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from analysis import dataset_relationships, model_cost, rain_detail, representation_map, temperature_sweep
from analysis.common import AnalysisError, dataset_labels, encode_images, pearson, read_embeddings, write_embeddings
from analysis.dataset_relationships import relationship_matrix
from analysis.model_cost import count_macs, count_parameters, parse_hparams
from analysis.rain_detail import summarize, z_shift
from analysis.representation_map import pca_2d
from analysis.temperature_sweep import checkpoint_temperature, contrastive_stats
from datasets import read_image
from models import build_encoder, build_model
from models.coim import ContextEmbedding, ModulatedConv2d
from utils.eval.inference import image_code, restore

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 16  # a small z keeps the tiny models tiny; also exercises dim != 128 everywhere
TINY_BRN = {"inter_iter": 1, "width": 8}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _psnr_by_hand(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR on BT.601 luma (0-255 scale, the offset cancels), peak 255, written out."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(1, 3, 1, 1)
    luma = [(t.double() * weights).sum(1) for t in (restored, clean)]
    mse = float(((luma[0] - luma[1]) ** 2).mean())
    return 10 * math.log10(255.0 ** 2 / mse)


def _blur_by_hand(x: torch.Tensor, sigma: float, size: int = 11) -> torch.Tensor:
    """One 2-D Gaussian kernel (outer product of the 1-D one), reflect padding, per channel."""
    r = size // 2
    taps = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    k1 = torch.tensor(taps, dtype=torch.float64) / sum(taps)
    k2 = torch.outer(k1, k1).to(x.dtype)
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    return torch.nn.functional.conv2d(padded, k2.expand(3, 1, size, size).contiguous(), groups=3)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(sum(a * b)) / math.sqrt(float(sum(a * a)) * float(sum(b * b)))


def _correlation(x, y) -> float:
    """Pearson r from the raw sums: (n Σxy - Σx Σy) / sqrt((n Σx² - (Σx)²)(n Σy² - (Σy)²))."""
    n = len(x)
    sx, sy = sum(x), sum(y)
    sxy, sxx, syy = sum(a * b for a, b in zip(x, y)), sum(a * a for a in x), sum(b * b for b in y)
    return (n * sxy - sx * sy) / math.sqrt((n * sxx - sx * sx) * (n * syy - sy * sy))


def _brn_from(path: str) -> nn.Module:
    """The tiny BRN of one of the checkpoints below, built and loaded here (not by the tools)."""
    ckpt = torch.load(path, weights_only=True)
    model = build_model("BRN", **ckpt["model_hparams"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


# ---------------------------------------------------------------------------- planted inputs
def test_relationship_matrix_equals_hand_computed():
    # A = {e1, e2}; B = {2·e1, (3, 3)} (not unit: normalised inside); C = one image.
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 3.0], [0.0, -1.0]])
    labels = ["A", "B", "A", "B", "C"]
    names, m, counts = relationship_matrix(emb, labels)
    assert names == ["A", "B", "C"] and counts == [2, 2, 1]
    r = 1 / math.sqrt(2)
    expected = torch.tensor([
        [0.0, (1 + r + 0 + r) / 4, (0 + -1) / 2],      # A-A: cos(e1, e2) = 0 (self-pairs excluded)
        [(1 + r + 0 + r) / 4, r, (0 + -r) / 2],         # B-B: cos(e1, (1,1)/√2)
        [(0 + -1) / 2, (0 + -r) / 2, math.nan],         # C has no pair of distinct images
    ], dtype=torch.float64)
    torch.testing.assert_close(m, expected, equal_nan=True)


def test_relationships_cli_on_planted_embeddings(tmp_path, capsys):
    r = 1 / math.sqrt(2)
    # x = {e1, e3}, y = {e2, (e1+e2) (normalised inside)}, w = {e1}: one image, so no diagonal.
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                       dtype=torch.float64)
    planted = str(tmp_path / "planted.csv")
    write_embeddings(planted, emb, ["x", "y", "x", "y", "w"], ["a.png", "b.png", "c.png", "d.png", "e.png"])
    out = str(tmp_path / "rel")
    assert dataset_relationships.main(["--embeddings", planted, "--save_path", out]) == 0
    rows = _read_csv(os.path.join(out, "relationships.csv"))
    assert rows[0] == ["dataset", "x", "y", "w"] and [r[0] for r in rows[1:]] == ["x", "y", "w"]
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
    # cross cosines by hand: x-y: cos(e1,e2)=0, cos(e1,(1,1)/√2)=r, cos(e3,·)=0; x-w: 1, 0; y-w: 0, r
    expected = torch.tensor([[0.0, (0 + r + 0 + 0) / 4, (1 + 0) / 2],
                             [(0 + r + 0 + 0) / 4, r, (0 + r) / 2],
                             [(1 + 0) / 2, (0 + r) / 2, math.nan]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15, equal_nan=True)
    assert os.path.getsize(os.path.join(out, "relationships.png")) > 0
    # The Markdown table: image counts, the matrix to 3 decimals, each row's most similar other dataset.
    md = [line for line in open(os.path.join(out, "relationships.md")).read().splitlines() if line.startswith("| ")]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in md]
    assert table[0] == ["dataset", "images", "x", "y", "w", "closest other"]
    assert table[1:] == [["x", "2", "0.000", "0.177", "0.500", "w"],   # 0.5 > r/4
                         ["y", "2", "0.177", "0.707", "0.354", "w"],   # r/2 > r/4
                         ["w", "1", "0.500", "0.354", "nan", "x"]]     # 0.5 > r/2


def test_z_shift_and_pearson_hand_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [-2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(z_shift(a, b), torch.tensor([1.0, 2.0, 1 - 1 / math.sqrt(2)], dtype=torch.float64))
    # x centred (-1, 0, 1), y centred (-7/3, -1/3, 8/3): r = 5 / (√2 · √114 / 3)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228), abs=1e-15)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5])) and math.isnan(pearson([1], [2]))


def test_rain_detail_summary_hand_values():
    rows = [dict(dataset="P", rain_shift=0.1, detail_shift=0.3, psnr_base=20.0, psnr_coic=21.0, psnr_gain=1.0),
            dict(dataset="P", rain_shift=0.3, detail_shift=0.1, psnr_base=20.0, psnr_coic=23.0, psnr_gain=3.0),
            dict(dataset="Q", rain_shift=0.5, detail_shift=0.2, psnr_base=30.0, psnr_coic=29.0, psnr_gain=-1.0)]
    p, q, every = summarize(rows)
    assert (p["dataset"], p["n"], q["n"], every["dataset"], every["n"]) == ("P", 2, 1, "all", 3)
    assert p["rain_shift_mean"] == pytest.approx(0.2) and p["rain_shift_std"] == pytest.approx(math.sqrt(0.02))
    assert p["psnr_gain"] == pytest.approx(2.0) and p["psnr_coic"] == pytest.approx(22.0)
    assert p["r_gain_rain"] == pytest.approx(1.0) and p["r_gain_detail"] == pytest.approx(-1.0)
    assert math.isnan(q["rain_shift_std"]) and math.isnan(q["r_gain_rain"])
    # all: gain (1, 3, -1) vs rain (0.1, 0.3, 0.5): centred (0, 2, -2)·(-0.2, 0, 0.2) = -0.4
    assert every["r_gain_rain"] == pytest.approx(-0.4 / (math.sqrt(8) * math.sqrt(0.08)))


def test_pca_2d_on_planted_points():
    # Points on a line through (1,2,2)/3: first coordinate is the signed distance, second is 0.
    line = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [2.0, 4.0, 4.0]])
    torch.testing.assert_close(pca_2d(line), torch.tensor([[-3.0, 0.0], [0.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    # Already centred, widest along x: PCA is the identity (signs fixed positive).
    cross = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(pca_2d(cross), cross.double())
    assert pca_2d(torch.ones(1, 5)).abs().sum() == 0


def test_parameter_and_mac_counts_on_a_planted_module():
    class Planted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ModulatedConv2d(3, 4, 3, padding=1, dim_in=8)
            self.ctx = ContextEmbedding(8, 5)

        def forward(self, x, z=None):
            return self.conv(x, z)

    model = Planted()
    enc = build_encoder(dim=8)
    counts = count_parameters(model, enc)
    assert counts == {"backbone_params": 4 * 3 * 9 + 4,
                      "coim_generator_params": (11 * 4 + 4) + (4 * 16 + 16) + (16 * 16 + 16),
                      "context_embedding_params": 8 * 5 + 5,
                      "encoder_params": sum(p.numel() for p in enc.encoder_q.parameters())}
    x, z = torch.rand(1, 3, 8, 8), torch.rand(1, 8)
    conv_macs = 4 * 3 * 9 * 8 * 8
    assert count_macs(lambda: model(x)) == conv_macs
    # modulated: the same convolution plus the generator MLP [z, mean(x)] (11) -> 4 -> 16 -> 16
    assert count_macs(lambda: model(x, z)) == conv_macs + 11 * 4 + 4 * 16 + 16 * 16


def test_macs_counted_on_meta_tensors_equal_a_real_run():
    model, encoder = build_model("BRN", dim_in=DIM, **TINY_BRN).eval(), build_encoder(dim=DIM).eval()
    x = torch.rand(1, 3, 24, 24)
    plain = count_macs(lambda: restore(model, x))
    modulated = count_macs(lambda: restore(model, x, image_code(encoder, x)))
    assert model_cost.restore_macs(model, encoder, 24, 0) == (plain, modulated)
    assert model_cost.encoder_macs(DIM) == count_macs(lambda: image_code(encoder, x))


def test_parse_hparams():
    got = parse_hparams(["BRN.inter_iter=2", "DRSformer.num_blocks=[1, 1, 1, 1]", "RCDNet.rain_kernel=k.mat"])
    assert got == {"BRN": {"inter_iter": 2}, "DRSformer": {"num_blocks": [1, 1, 1, 1]},
                   "RCDNet": {"rain_kernel": "k.mat"}}
    for bad in ("inter_iter=2", "Nope.x=1", "BRN.inter_iter"):
        with pytest.raises(AnalysisError):
            parse_hparams([bad])


def test_contrastive_stats_on_planted_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 0.0], [2.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    s = contrastive_stats(logits)
    # argmax 0 in rows 0 and 3 (a tie goes to the positive, as in the training log)
    assert (s["correct"], s["beats_rain"], s["beats_detail"], s["n"]) == (2.0, 3.0, 3.0, 4.0)
    expected_loss = sum(math.log(sum(math.exp(v) for v in row)) - row[0] for row in logits.tolist())
    assert s["loss_sum"] == pytest.approx(expected_loss, abs=1e-12)


def test_checkpoint_temperature_and_labels():
    assert checkpoint_temperature({"args": {"temperature": 0.2}, "encoder_hparams": {"temperature": 1.0}}) == 0.2
    assert checkpoint_temperature({"encoder_hparams": {"dim": 128, "temperature": 0.5}}) == 0.5
    assert checkpoint_temperature({"encoder_q.conv1.weight": torch.zeros(1)}) is None
    assert dataset_labels(["d/Rain200H/test", "d/Rain200L/test"]) == ["Rain200H/test", "Rain200L/test"]
    assert dataset_labels(["d/heavy/test", "d/heavy/test/norain"]) == ["heavy/test", "heavy/test/norain"]
    assert dataset_labels(["a/heavy/train", "b/heavy/train"]) == ["a/heavy/train", "b/heavy/train"]


def test_embeddings_round_trip_exactly(tmp_path):
    emb = torch.randn(5, 7, dtype=torch.float64)
    path = str(tmp_path / "e.csv")
    write_embeddings(path, emb, list("aabbc"), [f"{i}.png" for i in range(5)])
    back, labels, names = read_embeddings(path)
    assert torch.equal(back, emb) and labels == list("aabbc") and names[4] == "4.png"


# ---------------------------------------------------------------------------- the tools on the demo data
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random CoIC checkpoints at two temperatures (same weights) and a plain one."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpts")
    model = build_model("BRN", dim_in=DIM, **TINY_BRN)
    encoder = build_encoder(dim=DIM)
    out = {}
    for t in (0.5, 2.0):
        out[t] = str(folder / f"coic_t{t}.pth")
        torch.save({"model_name": "BRN", "model_hparams": {**TINY_BRN, "dim_in": DIM}, "model": model.state_dict(),
                    "encoder": encoder.state_dict(), "encoder_hparams": {"dim": DIM, "temperature": t},
                    "args": {"temperature": t, "crop_size": 24, "n_neg": 2}}, out[t])
    base = build_model("BRN", dim_in=0, **TINY_BRN)
    out["base"] = str(folder / "base.pth")
    torch.save({"model_name": "BRN", "model_hparams": {**TINY_BRN, "dim_in": 0}, "model": base.state_dict()},
               out["base"])
    return out


def _splits(root, split="test"):
    return [os.path.join(root, kind, split) for kind in ("light", "heavy", "hazy", "multiangle")]


def test_encoding_matches_test_time_code(checkpoints, tiny_demo):
    from analysis.common import load_encoder_file

    encoder, _ = load_encoder_file(checkpoints[0.5], torch.device("cpu"))
    path = os.path.join(tiny_demo, "heavy", "test", "rain", "000.png")
    torch.testing.assert_close(encode_images(encoder, [path], torch.device("cpu")),
                               image_code(encoder, read_image(path)[None]))


def test_published_moco_state_dict_and_missing_projection_package(tmp_path, checkpoints, tiny_demo, capsys):
    # A published encoder file is a bare MoCo state_dict (DataParallel prefix, no hyper-parameters).
    ours = torch.load(checkpoints[0.5], weights_only=True)["encoder"]
    published = str(tmp_path / "feat_epoch.pth")
    torch.save({f"module.{k}": v for k, v in ours.items()}, published)
    out = str(tmp_path / "rep")
    data = os.path.join(tiny_demo, "light", "test")
    assert representation_map.main(["--encoder", published, "--data_paths", data, "--save_path", out,
                                    "--device", "cpu"]) == 0
    rows = _read_csv(os.path.join(out, "embeddings.csv"))
    assert len(rows) == 1 + 4 and len(rows[0]) == 2 + DIM  # z's dimension read off the weights
    try:
        import sklearn  # noqa: F401
    except ImportError:
        assert representation_map.main(["--embeddings", os.path.join(out, "embeddings.csv"), "--projection", "tsne",
                                        "--save_path", out]) == 2
        assert "pip install scikit-learn" in capsys.readouterr().err


def test_representation_map_cli_pca_of_planted_embeddings(tmp_path):
    # Four points c ± 5u, c ± 2v with orthonormal u = (3,4,0)/5, v = (0,0,1): the mean is c, the widest
    # axis is u (spread 5), the next v (spread 2); both have a positive largest loading, so no sign flip.
    c = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    u = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    emb = torch.stack([c + 5 * u, c - 2 * v, c - 5 * u, c + 2 * v])
    planted = str(tmp_path / "planted.csv")
    write_embeddings(planted, emb, ["p", "p", "q", "q"], ["0", "1", "2", "3"])
    out = str(tmp_path / "rep")
    assert representation_map.main(["--embeddings", planted, "--save_path", out]) == 0
    rows = _read_csv(os.path.join(out, "projection_pca.csv"))
    assert rows[0] == ["dataset", "image", "x", "y"]
    assert [r[:2] for r in rows[1:]] == [["p", "0"], ["p", "1"], ["q", "2"], ["q", "3"]]
    got = torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]], dtype=torch.float64)
    expected = torch.tensor([[5.0, 0.0], [0.0, -2.0], [-5.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    back, labels, _ = read_embeddings(os.path.join(out, "embeddings.csv"))
    assert torch.equal(back, emb) and labels == ["p", "p", "q", "q"]
    assert os.path.getsize(os.path.join(out, "representation_pca.png")) > 0


def test_representation_map_and_relationships_cli(tmp_path, checkpoints, tiny_demo):
    data = _splits(tiny_demo) + [os.path.join(tiny_demo, "heavy", "test", "norain")]
    out = str(tmp_path / "rep")
    assert representation_map.main(["--encoder", checkpoints[0.5], "--data_paths", *data, "--num_images", "3",
                                    "--save_path", out, "--device", "cpu"]) == 0
    rows = _read_csv(os.path.join(out, "embeddings.csv"))
    assert len(rows) == 1 + 5 * 3 and len(rows[0]) == 2 + DIM
    assert [r[0] for r in rows[1::3]] == ["light/test", "heavy/test", "hazy/test", "multiangle/test",
                                          "heavy/test/norain"]
    assert len(_read_csv(os.path.join(out, "projection_pca.csv"))) == 16
    assert os.path.getsize(os.path.join(out, "representation_pca.png")) > 0
    assert os.path.isfile(os.path.join(out, "projector", "projector_config.pbtxt"))
    meta = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(out, "projector"))
            for f in files if f == "metadata.tsv"]
    assert len(meta) == 1 and len(open(meta[0]).read().splitlines()) == 1 + 15

    # Encoding again inside the relationships tool gives the matrix of the saved embeddings.
    rel = str(tmp_path / "rel")
    assert dataset_relationships.main(["--encoder", checkpoints[0.5], "--data_paths", ",".join(data),
                                       "--num_images", "3", "--save_path", rel, "--device", "cpu"]) == 0
    matrix = _read_csv(os.path.join(rel, "relationships.csv"))
    assert len(matrix) == 6 and all(len(r) == 6 for r in matrix)
    emb, labels, _ = read_embeddings(os.path.join(out, "embeddings.csv"))
    names = list(dict.fromkeys(labels))
    expected = torch.zeros(len(names), len(names), dtype=torch.float64)
    for a, name_a in enumerate(names):  # mean cosine over pairs of distinct images, one pair at a time
        for b, name_b in enumerate(names):
            cosines = [_cosine(emb[i], emb[j]) for i in range(len(labels)) for j in range(len(labels))
                       if labels[i] == name_a and labels[j] == name_b and i != j]
            expected[a, b] = sum(cosines) / len(cosines)
    got = torch.tensor([[float(v) for v in r[1:]] for r in matrix[1:]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_rain_detail_cli(tmp_path, checkpoints, tiny_demo):
    out = str(tmp_path / "rd")
    data = _splits(tiny_demo)[:2]
    assert rain_detail.main(["--data_paths", *data, "--coic_model", checkpoints[0.5], "--base_model",
                             checkpoints["base"], "--save_path", out, "--device", "cpu"]) == 0
    pairs = _read_csv(os.path.join(out, "rain_detail_pairs.csv"))
    assert pairs[0] == rain_detail.PAIR_COLUMNS and len(pairs) == 1 + 8
    for r in pairs[1:]:
        assert 0 <= float(r[2]) <= 2 and 0 <= float(r[3]) <= 2
        assert float(r[6]) == pytest.approx(float(r[5]) - float(r[4]), abs=1e-9)
    summary = _read_csv(os.path.join(out, "rain_detail.csv"))
    assert [r[0] for r in summary[1:]] == ["light/test", "heavy/test", "all"]
    assert summary[0][-2:] == ["r_gain_rain", "r_gain_detail"]
    assert os.path.getsize(os.path.join(out, "rain_detail.png")) > 0

    # Every number again, by hand: z from the test-time path, cosines as sums, our own blur and PSNR.
    from analysis.common import load_encoder_file
    from utils.images import resize_square

    encoder, _ = load_encoder_file(checkpoints[0.5], torch.device("cpu"))
    coic, base = _brn_from(checkpoints[0.5]), _brn_from(checkpoints["base"])
    by_hand = {}
    with torch.no_grad():
        for label, folder in zip(["light/test", "heavy/test"], data):
            for name in sorted(os.listdir(os.path.join(folder, "rain"))):
                rainy = read_image(os.path.join(folder, "rain", name))[None]
                clean = read_image(os.path.join(folder, "norain", name))[None]
                small = resize_square(clean, 128)
                z_rain, z_clean, z_blur = encoder(resize_square(rainy, 128)), encoder(small), encoder(
                    _blur_by_hand(small, 1.5))
                psnr_coic = _psnr_by_hand(restore(coic, rainy, z_rain), clean)
                psnr_base = _psnr_by_hand(restore(base, rainy), clean)
                by_hand[(label, name)] = [1 - _cosine(z_rain, z_clean), 1 - _cosine(z_clean, z_blur),
                                          psnr_base, psnr_coic, psnr_coic - psnr_base]
    assert sorted(by_hand) == sorted((r[0], r[1]) for r in pairs[1:])
    for r in pairs[1:]:
        # The shifts are small (about 1e-4) for a random encoder: compare them tightly.
        assert [float(v) for v in r[2:4]] == pytest.approx(by_hand[(r[0], r[1])][:2], rel=1e-3, abs=1e-7), r[:2]
        assert [float(v) for v in r[4:]] == pytest.approx(by_hand[(r[0], r[1])][2:], abs=1e-4), r[:2]
    for row in summary[1:]:
        s = dict(zip(summary[0], row))
        group = [v for (label, _), v in by_hand.items() if s["dataset"] in (label, "all")]
        rain, detail, gain = ([g[i] for g in group] for i in (0, 1, 4))
        assert int(s["n"]) == len(group) == (8 if s["dataset"] == "all" else 4)
        assert float(s["rain_shift_mean"]) == pytest.approx(statistics.mean(rain), rel=1e-3, abs=1e-7)
        assert float(s["rain_shift_std"]) == pytest.approx(statistics.stdev(rain), rel=1e-3, abs=1e-7)
        assert float(s["detail_shift_mean"]) == pytest.approx(statistics.mean(detail), rel=1e-3, abs=1e-7)
        assert float(s["psnr_gain"]) == pytest.approx(statistics.mean(gain), abs=2e-4)
        assert float(s["psnr_coic"]) == pytest.approx(statistics.mean(g[3] for g in group), abs=2e-4)
        assert float(s["r_gain_rain"]) == pytest.approx(_correlation(gain, rain), abs=1e-4)
        # A random encoder's detail shifts are about 1e-5: their correlation carries float32 noise near 1e-4.
        assert float(s["r_gain_detail"]) == pytest.approx(_correlation(gain, detail), abs=5e-4)

    # Without models: shifts only, from an explicit encoder.
    out2 = str(tmp_path / "rd2")
    assert rain_detail.main(["--encoder", checkpoints[0.5], "--data_paths", data[0], "--num_images", "2",
                             "--save_path", out2, "--device", "cpu"]) == 0
    pairs2 = _read_csv(os.path.join(out2, "rain_detail_pairs.csv"))
    assert pairs2[0] == rain_detail.PAIR_COLUMNS[:4] and len(pairs2) == 3
    first = {r[1]: r[2:4] for r in pairs[1:] if r[0] == "light/test"}
    assert all(r[2:] == first[r[1]] for r in pairs2[1:])  # same encoder, same shifts


def _brn_convs(width: int) -> list:
    """(in, out) channels of every 3x3 conv of BRN (bias on all): image branch, then rain branch."""
    image = [(9, width)] + [(3 * width, width)] * 4 + [(width, width)] * 2 * 5 + [(width, 3)]
    rain = [(6, width)] + [(3 * width, width)] * 4 + [(width, width)] * 2 * 3 + [(width, 3)]
    return image + rain


def _encoder_layers(width: int = 32) -> list:
    """(in, out, kernel, output side, bias) of the query/key encoder's convs on a 128x128 input."""
    layers = [(3, width, 3, 128, True)]
    for level, side in enumerate((64, 32, 16)):
        cin, cout = width * 2 ** level, width * 2 ** (level + 1)
        layers += [(cin, cout, 3, side, False), (cout, cout, 3, side, True), (cin, cout, 1, side, False)]
    return layers


def test_model_cost_cli(tmp_path):
    out = str(tmp_path / "cost")
    size, width, width_enc = 32, 8, 32
    assert model_cost.main(["--models", "BRN", "--size", str(size), "--hparams", "BRN.inter_iter=1",
                            f"BRN.width={width}", "--dim_in", str(DIM), "--warmup", "0", "--reps", "1",
                            "--save_path", out, "--device", "cpu"]) == 0
    rows = _read_csv(os.path.join(out, "cost.csv"))
    assert rows[0] == model_cost.COLUMNS and len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    convs = _brn_convs(width)
    # Each conv's generator: Linear(DIM + in, out), Linear(out, 16), Linear(16, in + out + 9), with biases.
    gen_params = [(DIM + i) * o + o + o * 16 + 16 + 16 * (i + o + 9) + (i + o + 9) for i, o in convs]
    gen_macs = [(DIM + i) * o + o * 16 + 16 * (i + o + 9) for i, o in convs]
    # Encoder: convs, two BatchNorm parameters per channel after each conv but the first, MLP 8w -> DIM -> DIM.
    enc = _encoder_layers(width_enc)
    enc_params = (sum(i * o * k * k + (o if b else 0) for i, o, k, _, b in enc) + sum(2 * o for _, o, _, _, _ in enc[1:])
                  + 8 * width_enc * DIM + DIM + DIM * DIM + DIM)
    enc_macs = sum(i * o * k * k * side * side for i, o, k, side, _ in enc) + 8 * width_enc * DIM + DIM * DIM
    plain_macs = sum(i * o * 9 for i, o in convs) * size * size  # inter_iter=1: every conv once per pixel
    assert {k: int(row[k]) for k in ("backbone_params", "coim_generator_params", "context_embedding_params",
                                     "encoder_params")} == {
        "backbone_params": sum(i * o * 9 + o for i, o in convs), "coim_generator_params": sum(gen_params),
        "context_embedding_params": 0, "encoder_params": enc_params}
    assert float(row["macs_normal_G"]) == pytest.approx(plain_macs / 1e9, rel=1e-12)
    assert float(row["macs_encoder_G"]) == pytest.approx(enc_macs / 1e9, rel=1e-12)
    assert float(row["macs_modulated_G"]) == pytest.approx((plain_macs + sum(gen_macs) + enc_macs) / 1e9, rel=1e-12)
    assert float(row["latency_normal_ms"]) > 0 and float(row["latency_modulated_ms"]) > 0
    assert os.path.isfile(os.path.join(out, "cost.md")) and os.path.getsize(os.path.join(out, "cost.png")) > 0


def test_temperature_sweep_cli(tmp_path, checkpoints, tiny_demo):
    out = str(tmp_path / "temp")
    assert temperature_sweep.main(["--checkpoints", checkpoints[2.0], checkpoints[0.5], "--data_paths",
                                   *_splits(tiny_demo), "--num_images", "2", "--batch_size", "4",
                                   "--save_path", out, "--device", "cpu"]) == 0
    rows = _read_csv(os.path.join(out, "temperature.csv"))
    assert rows[0] == temperature_sweep.COLUMNS and len(rows) == 3
    low, high = (dict(zip(rows[0], r)) for r in rows[1:])
    assert (float(low["temperature"]), float(high["temperature"])) == (0.5, 2.0)
    # Same weights, same exemplars: the argmax (accuracy) and PSNR agree, the loss does not.
    for key in ("contrastive_acc", "acc_vs_rain_negative", "acc_vs_detail_negatives", "psnr", "ssim"):
        assert low[key] == high[key] and low[key] != ""
    assert 0 <= float(low["contrastive_acc"]) <= 1
    assert float(low["contrastive_loss"]) != float(high["contrastive_loss"])
    assert os.path.getsize(os.path.join(out, "temperature.png")) > 0


def test_temperature_sweep_cli_with_a_planted_encoder(tmp_path, checkpoints, tiny_demo):
    # The last encoder block's BatchNorms (eval mode) are planted to output e0 everywhere, whatever the
    # image: every feature map is e0 at each position, so every logit is exactly 1/T. The positive wins
    # the ties (accuracies 1) and the InfoNCE loss is log(1 + 1 rain-aware + n_neg detail-aware) at any T;
    # z = normalise(mlp(e0)) for every image.
    ckpt = torch.load(checkpoints[0.5], weights_only=True)
    state = dict(ckpt["encoder"])
    for branch in ("encoder_q", "encoder_k"):
        last = f"{branch}.resblock.2"
        for key in (f"{last}.block.4", f"{last}.short_cut.1"):
            state[f"{key}.weight"] = torch.zeros_like(state[f"{key}.weight"])
            state[f"{key}.bias"] = torch.zeros_like(state[f"{key}.bias"])
        state[f"{last}.block.4.bias"][0] = 1.0
    paths = []
    for t in (2.0, 0.5):
        paths.append(str(tmp_path / f"planted_t{t}.pth"))
        torch.save({**ckpt, "encoder": state, "encoder_hparams": {"dim": DIM, "temperature": t},
                    "args": {**ckpt["args"], "temperature": t}}, paths[-1])
    n_neg = ckpt["args"]["n_neg"]
    data = os.path.join(tiny_demo, "hazy", "test")
    out = str(tmp_path / "temp")
    assert temperature_sweep.main(["--checkpoints", *paths, "--data_paths", data, "--batch_size", "4",
                                   "--save_path", out, "--device", "cpu"]) == 0

    w1, b1 = state["encoder_k.mlp.0.weight"].double(), state["encoder_k.mlp.0.bias"].double()
    w2, b2 = state["encoder_k.mlp.2.weight"].double(), state["encoder_k.mlp.2.bias"].double()
    hidden = w1[:, 0] + b1
    hidden = torch.where(hidden > 0, hidden, 0.1 * hidden)
    z = w2 @ hidden + b2
    z = (z / z.norm()).float()[None]
    model = _brn_from(checkpoints[0.5])
    names = sorted(os.listdir(os.path.join(data, "rain")))
    with torch.no_grad():
        scores = [_psnr_by_hand(restore(model, read_image(os.path.join(data, "rain", n))[None], z),
                                read_image(os.path.join(data, "norain", n))[None]) for n in names]

    rows = _read_csv(os.path.join(out, "temperature.csv"))
    assert rows[0] == temperature_sweep.COLUMNS and len(rows) == 3
    for row, t in zip(rows[1:], (0.5, 2.0)):  # sorted by temperature
        r = dict(zip(rows[0], row))
        assert float(r["temperature"]) == t
        assert [float(r[k]) for k in ("contrastive_acc", "acc_vs_rain_negative", "acc_vs_detail_negatives")] == [1, 1, 1]
        assert float(r["contrastive_loss"]) == pytest.approx(math.log(2 + n_neg), abs=1e-6)
        assert float(r["psnr"]) == pytest.approx(sum(scores) / len(scores), abs=1e-4)


def test_one_line_errors(tmp_path, checkpoints, tiny_demo, capsys):
    missing = str(tmp_path / "nope.pth")
    data = os.path.join(tiny_demo, "heavy", "test")
    cases = [
        (representation_map.main, ["--feat_ext", missing, "--data_paths", data], "checkpoint not found"),
        (dataset_relationships.main, ["--feat_ext", checkpoints[0.5], "--data_paths", str(tmp_path / "none")],
         "does not exist"),
        (rain_detail.main, ["--data_paths", data, "--coic_model", checkpoints[0.5]], "both --coic_model"),
        (rain_detail.main, ["--feat_ext", checkpoints["base"], "--data_paths", data], "holds no encoder"),
        (model_cost.main, ["--models", "Nope"], "unknown --models"),
        (model_cost.main, ["--threads", "0"], "--threads must be at least 1"),
        (temperature_sweep.main, ["--test_model", missing, "--data_paths", data], "checkpoint not found"),
    ]
    for main, argv, message in cases:
        assert main([*argv, "--save_path", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_runs_as_a_module_from_the_root(tmp_path):
    planted = str(tmp_path / "p.csv")
    write_embeddings(planted, torch.eye(3, dtype=torch.float64), ["a", "b", "a"], ["0", "1", "2"])
    out = str(tmp_path / "rel")
    done = subprocess.run([sys.executable, "-m", "analysis.dataset_relationships", "--embeddings", planted,
                           "--save_path", out], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(os.path.join(out, "relationships.csv"))
