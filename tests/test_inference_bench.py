"""benchmarks/inference.py: settings, the table's ratios, the layout timing, and a tiny end-to-end run."""
import json
import time

import torch
import torch.nn as nn

from benchmarks import inference
from utils.eval.precision import faster_memory_format


def test_settings_measured_once(monkeypatch):
    import utils.eval.precision

    monkeypatch.setattr(utils.eval.precision, "cpu_flags", lambda cpuinfo="": {"avx2"})
    measured, aliases = inference.resolve_settings(["fp32", "recommended", "channels_last"], torch.device("cpu"))
    # no native bf16: the recommended layout is timed per backbone (auto)
    assert measured == [("fp32", None, False, False), ("recommended", None, False, True),
                        ("channels_last", None, True, False)] and aliases == {}
    monkeypatch.setattr(utils.eval.precision, "cpu_flags", lambda cpuinfo="": {"amx_bf16"})
    measured, aliases = inference.resolve_settings(["fp32", "recommended", "bf16_channels_last"], torch.device("cpu"))
    assert measured == [("fp32", None, False, False), ("recommended", "bf16", True, False)]
    assert aliases == {"bf16_channels_last": "recommended"}


def test_table_ratios_by_hand():
    ms = {"published": {"plain": {"wall": 100.0, "cpu": 80.0}, "coic": {"wall": 120.0, "cpu": 100.0}},
          "fp32": {"plain": {"wall": 90.0, "cpu": 72.0}, "coic": {"wall": 130.0, "cpu": 110.0}},
          "recommended": {"plain": {"wall": 50.0, "cpu": 40.0}, "coic": {"wall": 60.0, "cpu": 50.0}}}
    results = {"X": {"ms": ms, "diffs": {"published_plain": 1e-7, "published_coic": 2e-7}, "aliases": {},
                     "recommended": {"plain": {"label": "bf16 + channels_last", "reason": "r"},
                                     "coic": {"label": "bf16", "reason": "r"}}}}
    plain, coic = inference.table_rows(results, ["fp32", "recommended"], {}, published=True)
    assert plain["recommended_setting"] == "bf16 + channels_last" and coic["recommended_setting"] == "bf16"
    assert (plain["fp32_ratio_wall"], plain["fp32_ratio_cpu"]) == (0.9, 0.9)
    assert (plain["recommended_speedup"], plain["recommended_speedup_cpu"]) == (2.0, 2.0)
    assert coic["fp32_ratio_wall"] == 130.0 / 120.0 and coic["recommended_speedup"] == 2.0
    assert coic["max_diff_published"] == 2e-7 and coic["ours_recommended_ms"] == 60.0
    # the recommended setting measured as fp32 (an alias): its numbers are fp32's
    results["X"]["aliases"] = {"recommended": "fp32"}
    plain, _ = inference.table_rows(results, ["fp32", "recommended"], {}, published=True)
    assert plain["ours_recommended_ms"] == 90.0 and plain["recommended_speedup"] == 100.0 / 90.0


class _Burner(nn.Module):
    """Burns more CPU time in the layout it dislikes."""

    def __init__(self, slow_channels_last: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.slow_channels_last = slow_channels_last

    def forward(self, x, z=None):
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        end = time.process_time() + (0.03 if cl == self.slow_channels_last else 0.005)
        while time.process_time() < end:
            pass
        return self.conv(x)


def test_faster_memory_format_times_both_and_restores_the_default():
    for slow_cl in (True, False):
        model = _Burner(slow_cl)
        channels_last, ms = faster_memory_format(model, torch.device("cpu"), side=16, repeats=2)
        assert channels_last is (not slow_cl)
        assert ms["channels_last" if slow_cl else "contiguous"] > 25 > 10 > ms["contiguous" if slow_cl else
                                                                              "channels_last"]
        assert model.conv.weight.is_contiguous()


def test_tiny_run_writes_the_table(tmp_path):
    out = tmp_path / "res"
    assert inference.main(["--models", "BRN", "--size", "32", "--rounds", "1", "--warmup", "0", "--settings",
                           "fp32", "--conv_size", "16", "--save_path", str(out)]) == 0
    report = json.loads((out / "inference.json").read_text())
    assert [(r["backbone"], r["mode"]) for r in report["rows"]] == [("BRN", "plain"), ("BRN", "CoIC")]
    assert all(r["ours_fp32_ms"] > 0 for r in report["rows"])
    assert report["conv"][0]["backbone"] == "BRN" and report["conv"][0]["ratio"] > 0
    md = (out / "inference.md").read_text()
    assert "| BRN | plain |" in md and "modulated ÷ plain" in md
    rates = report["conv_rate_gflops"]
    assert rates["fp32"] > 0 and rates["bf16"] > 0 and "ours fp32 GFLOP/s (share of the conv rate)" in md
    assert f"fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s" in md


def test_conv_flops_by_hand():
    from benchmarks.roofline import conv3x3_flops

    assert conv3x3_flops(32, 256) == 1_207_959_552  # 32 x 32 x 9 MACs per pixel, 65,536 pixels, 2 FLOPs per MAC


def test_gflops_and_share_of_the_conv_rate_by_hand():
    ms = {"fp32": {"plain": {"wall": 1000.0, "cpu": 1.0}, "coic": {"wall": 2000.0, "cpu": 1.0}},
          "bf16": {"plain": {"wall": 250.0, "cpu": 1.0}, "coic": {"wall": 400.0, "cpu": 1.0}}}
    results = {"X": {"ms": ms, "diffs": {}, "aliases": {}, "flops": {"plain": 4e9, "coic": 6e9},
                     "amps": {"fp32": None, "bf16": "bf16"}}}
    plain, coic = inference.table_rows(results, ["fp32", "bf16"], {}, published=False,
                                       rates={"fp32": 20.0, "bf16": 64.0})
    assert plain["ours_fp32_gflops"] == "4 (20 %)"  # 4e9 FLOPs in 1 s, of 20 GFLOP/s
    assert plain["ours_bf16_gflops"] == "16 (25 %)"  # 4e9 in 0.25 s, of bf16's 64
    assert coic["ours_fp32_gflops"] == "3 (15 %)" and coic["ours_bf16_gflops"] == "15 (23 %)"


def test_worker_counts_the_flops_of_a_restoration():
    """BRN in its reference configuration, plain mode, by hand: 8 recurrent iterations of two branches
    of 3x3 convolutions (image: 9->32, four gates 96->32, five residual blocks of two 32->32, 32->3; rain:
    6->32, four gates, three residual blocks, 32->3), 2 FLOPs per MAC, over a 24 x 24 image."""
    server = inference.OursServer()
    server.setup({"model": "BRN", "size": 24, "threads": 1, "device": "cpu", "seed": 0, "overlap": 8,
                  "check_size": 24, "amp": None, "channels_last": False, "auto": False})
    image = 9 * 32 + 4 * 96 * 32 + 10 * 32 * 32 + 32 * 3
    rain = 6 * 32 + 4 * 96 * 32 + 6 * 32 * 32 + 32 * 3
    flops = server.flops({})
    assert flops["plain"] == 2 * 9 * (image + rain) * 8 * 24 * 24
    assert flops["coic"] > flops["plain"]  # plus the encoder and the CoI-M generators


def test_recommended_layout_is_chosen_per_mode(monkeypatch):
    """IDT's modulated convolutions prefer channels-last where its plain ones do not: the worker of the
    recommended setting times (here: is told) each mode's layout and runs each mode in its own."""
    import utils.eval.precision
    from utils.eval.precision import Setting

    asked = []

    def fake(device, model=None, z=None, flags=None):
        asked.append(z is not None)
        return Setting(None, z is not None, "coic prefers channels-last" if z is not None else "plain: default")

    monkeypatch.setattr(utils.eval.precision, "recommended_setting", fake)
    server = inference.OursServer()
    got = server.setup({"model": "BRN", "size": 24, "threads": 1, "device": "cpu", "seed": 0, "overlap": 8,
                        "check_size": 24, "amp": None, "channels_last": False, "auto": True})
    assert sorted(asked) == [False, True]
    assert got["channels_last"] == [False, True] and got["reason"] == ["plain: default", "coic prefers channels-last"]
    conv = next(m for m in server.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4)
    for mode, cl in (("coic", True), ("plain", False), ("coic", True)):
        server.run({"mode": mode, "n": 1})
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is cl
        assert conv.weight.is_contiguous() is (not cl)


def test_output_difference_is_absolute_up_to_one_and_relative_above():
    from benchmarks.inference import output_difference

    ref = torch.tensor([0.5, -0.25, 0.75])
    assert output_difference(ref, torch.tensor([0.5, -0.5, 0.75])) == 0.25  # outputs within 1: absolute
    big = torch.tensor([4.0e10, -1.0, 2.0], dtype=torch.float64)
    off = torch.tensor([4.0e10 + 8192.0, -1.0, 2.0], dtype=torch.float64)
    assert output_difference(big, off) == 8192.0 / 4.0e10  # above 1: relative to the largest |output|
    assert output_difference(big, big.clone()) == 0.0
