"""CoI-M kernel temperature per layer (analysis/modulation_temperature.py) on planted generators."""
import csv
import math
import os
import shutil

import pytest
import torch

from analysis.common import AnalysisError
from analysis.modulation_temperature import layer_temperatures, main
from models import build_model
from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, log_temperature

pytest.importorskip("matplotlib")


def _plant(layer, code):
    """The generator outputs ``code`` whatever its input."""
    last = layer.generator[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(code))


def _by_hand(a, b, c):
    spread = sum(t - min(c) for t in c) / len(c)
    values = [-math.log(1 / (1 + math.exp(-(ao + bi)))) - math.log(spread + 1e-8) for ao in a for bi in b]
    return sum(values) / len(values)


def test_planted_generator_gives_the_hand_computed_temperature():
    a, b, c = [0.0, 1.0, -1.0], [0.5, -0.5], [0.1 * k for k in range(9)]
    conv = ModulatedConv2d(2, 3, 3, dim_in=4)
    _plant(conv, a + b + c)  # the published split: [a (C_out) | b (C_in) | c (k²)]
    x, z = torch.rand(1, 2, 5, 5), torch.rand(1, 4)
    assert float(log_temperature(*conv.modulation_codes(x, z)).detach()) == pytest.approx(_by_hand(a, b, c), rel=1e-5)
    up = ModulatedConvTranspose2d(2, 3, 2, stride=2, padding=0, dim_in=4)
    taps = [0.3, -0.2, 0.9, 0.0]
    _plant(up, b + a + taps)  # the transposed layer's split: [b (C_in) | a (C_out) | c]
    assert float(log_temperature(*up.modulation_codes(x, z)).detach()) == pytest.approx(_by_hand(a, b, taps), rel=1e-5)


def test_hooks_see_every_modulated_call_in_forward_order_and_need_a_code():
    torch.manual_seed(0)
    model = build_model("BRN", inter_iter=2).eval()
    x, z = torch.rand(1, 3, 16, 16), torch.nn.functional.normalize(torch.randn(1, 128), dim=1)
    values = layer_temperatures(model, x, z)
    layers = [name for name, m in model.named_modules() if isinstance(m, ModulatedConv2d) and m.modulated]
    assert len(values) > len(layers)  # recurrent: layers run once per iteration
    assert {name for name, _ in values} <= set(layers)
    first = dict(model.named_modules())[values[0][0]]
    first_input = []
    handle = first.register_forward_pre_hook(lambda m, args: first_input.append(args[0]) if not first_input else None)
    model(x, z)
    handle.remove()
    expected = float(log_temperature(*first.modulation_codes(first_input[0], z)).detach())
    assert values[0][1] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(AnalysisError, match="needs a code z"):
        layer_temperatures(model, x, None)


def test_tool_on_identical_images_gives_zero_std(tmp_path, tiny_demo, tiny_run):
    ckpt = tiny_run
    same = tmp_path / "same"
    same.mkdir()
    source = os.path.join(tiny_demo, "heavy", "test", "rain", sorted(os.listdir(os.path.join(tiny_demo, "heavy",
                                                                                         "test", "rain")))[0])
    for k in range(3):
        shutil.copy(source, same / f"{k}.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", ckpt, "--data_paths", str(same), os.path.join(tiny_demo, "light", "test"),
                 "--labels", "same", "light", "--save_path", str(out), "--threads", "1"]) == 0
    with open(out / "temperature_layers.csv") as f:
        rows = list(csv.DictReader(f))
    mine = [r for r in rows if r["dataset"] == "same"]
    assert mine and all(float(r["std"]) == 0.0 and r["n"] == "3" for r in mine)
    assert [r["layer"] for r in mine] == [str(i) for i in range(len(mine))]
    assert any(float(r["std"]) > 0 for r in rows if r["dataset"] == "light")
    assert (out / "temperature.png").stat().st_size > 0 and "differ most" in (out / "temperature.md").read_text()
