"""The recommended inference setting per machine, and bf16 autocast output against float32."""
import logging
import os

import pytest
import torch
from contract import tiny_args, tiny_image, tiny_model
from helpers import unit_codes

from models import available_models
from utils.eval.inference import image_code, restore
from utils.eval.precision import cpu_flags, native_bf16, recommended_setting


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(str(tmp_path / "absent")) == set()


@pytest.mark.parametrize("flags,native", [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True),
                                          ({"amx_bf16", "amx_tile"}, True), ({"avx512f", "avx512_vnni"}, False)])
def test_bf16_only_where_the_cpu_computes_it(flags, native):
    assert native_bf16(flags) is native
    setting = recommended_setting(torch.device("cpu"), flags)
    assert (setting.amp, setting.channels_last) == (("bf16", True) if native else (None, False))
    assert setting.reason


def test_cuda_recommends_bf16_channels_last():
    setting = recommended_setting(torch.device("cuda"))
    assert (setting.amp, setting.channels_last, setting.label) == ("bf16", True, "bf16 + channels_last")


@pytest.mark.parametrize("flags,recommended", [
    # written out by hand per flag set: what the log line must say is recommended
    ("fpu sse2 avx2 fma", "fp32"),
    ("fpu avx2 avx512f avx512_bf16", "bf16 + channels_last"),
    ("fpu avx2 amx_bf16 amx_tile", "bf16 + channels_last"),
])
def test_test_model_logs_the_setting_and_the_recommendation(caplog, monkeypatch, flags, recommended):
    from utils.eval.precision import inference_setting

    monkeypatch.setenv("COIC_CPU_FLAGS", flags)
    with caplog.at_level(logging.INFO, logger="coic.speed"):
        chosen = inference_setting("bf16", False, False, torch.device("cpu"))
    assert (chosen.amp, chosen.channels_last) == ("bf16", False)
    line = caplog.records[-1].getMessage()
    assert line.startswith("inference setting: bf16 on ")
    assert f"; recommended here: {recommended} (--recommended; " in line, line
    with caplog.at_level(logging.INFO, logger="coic.speed"):
        chosen = inference_setting("off", False, True, torch.device("cpu"))
    assert "(the recommended one: " in caplog.records[-1].getMessage()
    assert chosen.label == recommended


@pytest.mark.parametrize("name", available_models())
def test_bf16_autocast_restores_close_to_fp32(name):
    """The recommended path of a native-bf16 CPU (bf16 autocast + channels-last), both modes, on the
    tiny model: the image differs from float32 by bf16 rounding only."""
    model = tiny_model(name).eval()
    x = tiny_image(name, batch=1)
    z = unit_codes(1, tiny_args(name).dim_in, 0)
    ref = [restore(model, x), restore(model, x, z)]
    model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [restore(model, xc).float(), restore(model, xc, z).float()]
    for r, g in zip(ref, got):
        diff = (r - g).abs()
        # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); the tiny networks stay within
        # a few steps of it. A wrong layout, a lost modulation or a float16 overflow is far above.
        assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.08, (name, float(diff.mean()), float(diff.max()))
    assert not torch.equal(ref[0], got[0])  # bf16 did run


def test_image_code_runs_under_autocast():
    from models import build_encoder

    encoder = build_encoder(dim=16).eval()
    x = torch.rand(1, 3, 40, 52)
    z32 = image_code(encoder, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = image_code(encoder, x).float()
    assert z16.shape == z32.shape and float((z16 - z32).abs().max()) < 0.05


class _Verified(torch.nn.Module):
    bf16_verified = ("plain",)


class _Unverified(torch.nn.Module):
    pass


# (flags, model, coic) -> test_model's default setting, written out by hand
DEFAULTS = [
    ("fpu avx2 fma", _Verified, False, "fp32"),  # no native bf16: float32 whatever the model
    ("fpu avx512f avx512_bf16", _Verified, False, "bf16 + channels_last"),
    ("fpu amx_bf16 amx_tile", _Verified, False, "bf16 + channels_last"),
    ("fpu avx512f avx512_bf16", _Verified, True, "fp32"),  # the CoIC mode is not declared shown
    ("fpu avx512f avx512_bf16", _Unverified, False, "fp32"),
]


@pytest.mark.parametrize("flags,model,coic,label", DEFAULTS)
def test_the_default_is_bf16_only_where_native_and_shown(flags, model, coic, label):
    from utils.eval.precision import default_setting

    got = default_setting(torch.device("cpu"), model(), coic, flags=set(flags.split()))
    assert got.label == label and got.reason


def test_precision_flags_override_the_default(monkeypatch):
    from utils.eval.precision import inference_setting

    monkeypatch.setenv("COIC_CPU_FLAGS", "fpu avx512f avx512_bf16")
    cpu = torch.device("cpu")
    assert inference_setting("off", False, False, cpu, _Verified()).label == "bf16 + channels_last"
    assert inference_setting("off", False, False, cpu, _Verified(), precision="fp32").label == "fp32"
    assert inference_setting("off", False, False, cpu, _Unverified(), precision="bf16").label == \
        "bf16 + channels_last"
    assert inference_setting("fp16", False, False, cpu, _Verified()).label == "fp16"  # --amp as typed
    assert inference_setting("off", True, False, cpu, _Verified(), precision="fp32").label == "fp32 + channels_last"
    monkeypatch.setenv("COIC_CPU_FLAGS", "fpu avx2")
    assert inference_setting("off", False, False, cpu, _Verified()).label == "fp32"


def test_the_published_baseline_brn_mode_is_declared_shown():
    """benchmarks/bf16_accuracy.py measured the published baseline BRN (plain mode) within 0.05 dB / 0.05
    NIQE of fp32 on the demo test split and 1.2-megapixel synthetic rain (docs/speed.md)."""
    from models.brn import BRN

    assert "plain" in BRN.bf16_verified


def test_bf16_accuracy_benchmark_tables_both_sets(tmp_path, tiny_demo):
    """benchmarks/bf16_accuracy.py on a tiny BRN: every rain type of both sets gets a row, the large
    pictures have the asked size, and the fp32 column is the PSNR computed here by hand."""
    import math

    from benchmarks import bf16_accuracy
    from utils.checkpoint import save_atomic
    from utils.eval.inference import restore
    from utils.images import read_image

    model = tiny_model("BRN", dim_in=0).eval()
    path = str(tmp_path / "tiny.pth")
    save_atomic({"model_name": "BRN", "model_hparams": {"inter_iter": 1, "dim_in": 0},
                 "model": model.state_dict()}, path)
    out = tmp_path / "out"
    assert bf16_accuracy.main(["--test_model", path, "--model_name", "BRN", "--load_mode", "normal",
                               "--demo_root", tiny_demo, "--large_side", "96", "--large_images", "1",
                               "--threads", "1", "--save_path", str(out)]) == 0
    text = (out / "BRN_plain.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| demo test |") or ln.startswith("| synthetic 96 |")]
    assert len(rows) == 8 and "| synthetic 96 | light | 1 | 96x64 |" in text  # chelsea is 300x451
    # the light type of the demo split in fp32, by hand: mean over its pictures of Y-PSNR (coic protocol)
    folder = os.path.join(tiny_demo, "light", "test")
    values = []
    for name in sorted(os.listdir(os.path.join(folder, "rain"))):
        x, clean = read_image(os.path.join(folder, "rain", name)), read_image(os.path.join(folder, "norain", name))
        y = restore(model, x[None])[0].clamp(0, 1)

        def luma(img):
            r, g, b = (c.double() * 255 for c in img)
            return 16 + 0.256789 * r + 0.504129 * g + 0.097906 * b

        values.append(10 * math.log10(255 ** 2 / float(((luma(y) - luma(clean)) ** 2).mean())))
    light = next(r for r in rows if r.startswith("| demo test | light |")).split(" | ")
    assert float(light[4]) == pytest.approx(sum(values) / len(values), abs=0.02)
    assert "Per rain type, the means differ by at most" in text


@pytest.mark.parametrize("flags,argv,amp", [
    ("fpu avx512f avx512_bf16", ["--demo"], "bf16"),  # the demo trains in bf16 where the CPU computes it
    ("fpu avx2 fma", ["--demo"], "off"),
    ("fpu avx512f avx512_bf16", ["--demo", "--amp", "off"], "off"),  # a typed flag wins
    ("fpu avx512f avx512_bf16", [], "off"),  # only the demo: the reference recipe trains as published
])
def test_demo_training_precision_follows_the_cpu(monkeypatch, flags, argv, amp):
    from utils.train.config import parse_train_args

    monkeypatch.setenv("COIC_CPU_FLAGS", flags)
    assert parse_train_args("BRN", argv).amp == amp
