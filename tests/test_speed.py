"""The recommended inference setting per machine, and bf16 autocast output against float32."""
import logging

import pytest
import torch

from contract import tiny_args, tiny_image, tiny_model, unit_codes
from models import available_models
from utils.inference import image_code, restore
from utils.speed import cpu_flags, native_bf16, recommended_setting


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
    from utils.speed import inference_setting

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
