"""RCDNet backbone: stage outputs, stage-loss gradients, rain kernels, parameter counts, checkpoints.

The contract (both modes, z=None ignores the generators, gradients, sizes) is checked for every
backbone in test_models_contract.py. Forward passes use the recipe's tiny configuration on 16x16
crops; only the parameter-count test builds the reference configuration (without running it).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from contract import tiny_args, tiny_image
from contract import tiny_model as _tiny_model
from helpers import scramble_coic, unit_codes

from models.coim import modulation_parameters
from models.rcdnet import RCDNet, RCDNetStages, load_rain_kernel, streak_kernel_bank
from utils.checkpoint import load_weights

TINY = tiny_args("RCDNet").model_hparams  # the recipe's tiny configuration


def tiny_model(seed: int = 0, **overrides) -> RCDNet:
    return _tiny_model("RCDNet", seed, **overrides)


def image() -> torch.Tensor:
    return tiny_image("RCDNet")


def test_declares_size_multiple():
    assert RCDNet.size_multiple == 1


def backgrounds_by_hand(model: RCDNet, x: torch.Tensor, z=None) -> list[torch.Tensor]:
    """The background estimates (0-255) of every stage and of the final refinement, assembled from
    the sub-modules and the published update rules (RCDNet, Wang et al. 2020, eqs. 9-12)."""
    rainy = x * 255.0
    state = model.init_net(torch.cat([rainy, F.conv2d(rainy, model.cz, padding=1)], dim=1), z)
    b0, background, aux = state[:, :3], state[:, :3], state[:, 3:]
    pad = model.c.shape[-1] // 2
    backgrounds, maps, rain = [], None, None
    for s in range(model.inter_iter):
        if s == 0:
            residual = F.relu(rainy - b0 - model.tau)
            maps = model.map_nets[0](F.conv_transpose2d(residual, model.c0 / 10, padding=pad), z)
        else:
            grad = F.conv_transpose2d(rain - (rainy - background), model.c / 10, padding=pad)
            maps = model.map_nets[s](maps - model.m_step[s - 1] / 10 * grad, z)
        rain = F.conv2d(maps, model.c / 10, padding=pad)
        eta = model.b_step[s] / 10
        state = model.background_nets[s](torch.cat([(1 - eta) * background + eta * (rainy - rain), aux], 1), z)
        background, aux = state[:, :3], state[:, 3:]
        backgrounds.append(background)
    backgrounds.append(model.final_net(state, z)[:, :3])
    return backgrounds


def test_stage_outputs_on_255_scale():
    model = tiny_model().eval()
    x = image()
    with torch.no_grad():
        stages = model.forward_stages(x)
        final = model(x)
        by_hand = backgrounds_by_hand(model, x)
        modulated = model(x, unit_codes(2, TINY["dim_in"], 0))
        by_hand_modulated = backgrounds_by_hand(model, x, unit_codes(2, TINY["dim_in"], 0))
    assert isinstance(stages, RCDNetStages)
    assert stages.b0.shape == x.shape
    assert len(stages.backgrounds) == TINY["inter_iter"] + 1
    assert len(stages.rain_layers) == TINY["inter_iter"]
    assert all(t.shape == x.shape for t in stages.backgrounds + stages.rain_layers)
    # forward is the final refinement's background brought back from 0-255 to [0,1] (not a stage's).
    torch.testing.assert_close(final * 255.0, by_hand[-1])
    torch.testing.assert_close(modulated * 255.0, by_hand_modulated[-1])
    for got, expected in zip(stages.backgrounds, by_hand):
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(final * 255.0, by_hand[-2], atol=1e-3)  # the refinement does change it
    # The first stage sees the rainy image scaled to 0-255: its rain estimate comes from
    # relu(255*x - b0 - tau) through non-negative kernels and ReLU'd maps, so it is >= 0.
    assert stages.rain_layers[0].min() >= 0


@pytest.mark.parametrize("with_code", [False, True])
def test_backward_reaches_generators_only_with_code(with_code):
    model = tiny_model().train()
    scramble_coic(model, std=0.1)
    z = unit_codes(2, TINY["dim_in"], 0).requires_grad_(True) if with_code else None
    stages = model.forward_stages(image(), z)
    loss = sum(b.square().mean() for b in stages.backgrounds) + stages.rain_layers[-1].square().mean()
    loss.backward()

    generator_ids = {id(p) for p in modulation_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in generator_ids:
            if with_code:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
    for name in ("c0", "c", "cz", "tau", "b_step", "m_step"):
        assert getattr(model, name).grad is not None, name
    if with_code:
        assert z.grad is not None and z.grad.abs().sum() > 0


def test_parameter_count_matches_reference():
    # Counts of the published RCDNet_CoIM at inter_iter=17, num_map=num_channel=32,
    # num_block=4, dim_in=128 (measured by instantiating the published code).
    model = RCDNet()
    total = sum(p.numel() for p in model.parameters())
    generators = sum(p.numel() for p in modulation_parameters(model))
    assert total == pytest.approx(5_080_610, rel=5e-3)
    assert generators == pytest.approx(2_105_424, rel=5e-3)


# ---- rain kernels -------------------------------------------------------------------

def test_streak_bank_is_deterministic_and_sane():
    bank = streak_kernel_bank(32)
    assert bank.shape == (3, 32, 9, 9)
    assert torch.equal(bank, streak_kernel_bank(32))
    assert bank.min() >= 0
    torch.testing.assert_close(bank.sum(dim=(2, 3)), torch.full((3, 32), 0.5))
    assert torch.equal(bank[0], bank[1]) and torch.equal(bank[0], bank[2])  # achromatic
    flat = bank[0].flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 32  # all kernels distinct
    # Streaks are elongated: the near-vertical long kernels have more mass along the
    # vertical axis through the centre than along the horizontal one.
    long_vertical = bank[0, 3 + 8 * 3]
    assert long_vertical[:, 4].sum() > 2 * long_vertical[4, :].sum()
    model = tiny_model()
    torch.testing.assert_close(model.c0.detach(), streak_kernel_bank(TINY["num_map"]))


def test_rain_kernel_from_tensor_and_files(tmp_path):
    kernel = torch.rand(3, TINY["num_map"], 5, 5)
    model = tiny_model(rain_kernel=kernel)
    torch.testing.assert_close(model.c0.detach(), kernel)
    torch.testing.assert_close(model.c.detach(), kernel)
    assert model.c0.data_ptr() == model.c.data_ptr()  # shared by default
    separate = tiny_model(rain_kernel=kernel, rain_kernels="separate")
    torch.testing.assert_close(separate.c.detach(), kernel)
    assert separate.c0.data_ptr() != separate.c.data_ptr()  # independent parameters
    with torch.no_grad():
        assert model(image()).shape == (2, 3, 16, 16)  # 5x5 kernels pad by 2

    np.save(tmp_path / "k.npy", kernel.numpy())
    torch.save({"C9": kernel}, tmp_path / "k.pt")
    for name in ("k.npy", "k.pt"):
        torch.testing.assert_close(load_rain_kernel(tmp_path / name, TINY["num_map"]), kernel)
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "kernel.mat", {"C9": kernel.double().numpy()})
    loaded = load_rain_kernel(str(tmp_path / "kernel.mat"), TINY["num_map"])
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, kernel)


def test_bad_rain_kernel_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.mat"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        tiny_model(rain_kernel=missing)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, TINY["num_map"] + 1, 9, 9), dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        tiny_model(rain_kernel=wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(garbage))) as info:
        tiny_model(rain_kernel=garbage)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        tiny_model(rain_kernel=torch.zeros(3, TINY["num_map"], 8, 8))  # even kernel size


# ---- one rain kernel in both places (the published code) -------------------------------

def _one_adam_step(model: RCDNet) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.forward_stages(image()).backgrounds[-1].square().mean().backward()
    opt.step()


def test_shared_kernel_is_one_parameter_trained_by_both_uses():
    model = tiny_model(seed=2)
    start = model.c.detach().clone()
    # Counted once: the separate model has exactly one kernel's worth of parameters more.
    kernel_size = 3 * TINY["num_map"] * 9 * 9
    separate_count = sum(p.numel() for p in tiny_model(seed=2, rain_kernels="separate").parameters())
    assert sum(p.numel() for p in model.parameters()) == separate_count - kernel_size
    # Its gradient is the sum of the first-stage (c0) and the later-stage (c) gradients, taken here
    # from a separate model with the same weights.
    twin = tiny_model(seed=2, rain_kernels="separate")
    twin.load_state_dict(model.state_dict())
    twin.forward_stages(image()).backgrounds[-1].square().mean().backward()
    _one_adam_step(model)
    state = model.state_dict()
    assert set(state) >= {"c0", "c"} and torch.equal(state["c0"], state["c"])
    assert not torch.equal(state["c"], start)  # it was trained
    grad = model.c.grad
    torch.testing.assert_close(grad, twin.c0.grad + twin.c.grad, rtol=1e-5, atol=1e-7)
    assert twin.c0.grad.abs().sum() > 0 and twin.c.grad.abs().sum() > 0  # both uses contribute


def test_shared_kernel_survives_conversions_and_separate_ones_drift_apart():
    model = tiny_model().to(torch.float64)  # a conversion replaces every parameter's data, like .cuda()
    assert model.c0 is model.c and model.c.dtype == torch.float64
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # conversions make new Parameters
    try:
        model = model.to(torch.float32)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    assert model.c0 is model.c and model.c.dtype == torch.float32
    model = model.float()
    _one_adam_step(model)
    assert torch.equal(model.state_dict()["c0"], model.state_dict()["c"])
    separate = tiny_model(rain_kernels="separate")
    _one_adam_step(separate)
    assert not torch.equal(separate.c0, separate.c)


def test_kernels_load_from_both_keys_and_mismatches_are_explained(tmp_path):
    from utils.errors import ModelConfigError
    from utils.eval.evaluation import load_model

    source = tiny_model(seed=3, rain_kernels="separate").eval()
    with torch.no_grad():
        source.c.copy_(source.c0)  # a published-layout file from a run whose kernels stayed one
    state = published_state(source)
    shared = tiny_model(seed=4)
    load_weights(shared, state)
    torch.testing.assert_close(shared.c, source.c0, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(shared.eval()(image()), source(image()), rtol=0, atol=0)

    with torch.no_grad():
        source.c.add_(0.25)  # two kernels: a shared model refuses it in one line, naming the way out
    with pytest.raises(ModelConfigError, match=r"rain_kernels='separate'.*--rain_kernels separate") as info:
        load_weights(tiny_model(seed=4), published_state(source))
    assert "\n" not in str(info.value) and "0.25" in str(info.value)
    # A file that does not record its settings is built as its weights show: separate kernels here.
    torch.save(published_state(source), tmp_path / "published.pth")
    hparams = {k: v for k, v in TINY.items() if k != "rain_kernels"}  # the sizes only
    loaded, _ = load_model("RCDNet", str(tmp_path / "published.pth"), "normal", torch.device("cpu"), hparams)
    assert loaded.rain_kernels == "separate"
    torch.testing.assert_close(loaded.c, source.c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rain_kernels"):
        tiny_model(rain_kernels="tied")


# ---- checkpoints --------------------------------------------------------------------

# Our name -> the published RCDNet_CoIM name, written out independently of the model's
# own remapping.
OURS_TO_PUBLISHED = [
    (r"^map_nets\.", "proxNet_M_S."),
    (r"^background_nets\.", "proxNet_B_S."),
    (r"^init_net\.", "proxNet_B_0."),
    (r"^final_net\.", "proxNet_B_L."),
    (r"\.units\.", ".layer."),
    (r"\.(conv[12])\.(weight|bias)$", r".\1.base_conv.conv.\2"),
    (r"\.(conv[12])\.generator\.", r".\1.g2pa_wgen."),
]

# Names read off the published code (inter_iter=2, num_block=1).
PUBLISHED_KEYS = [
    "c0", "c", "cz", "tau", "m_step", "b_step",
    "proxNet_M_S.0.tau",
    "proxNet_M_S.1.layer.0.conv2.base_conv.conv.weight",
    "proxNet_M_S.1.layer.0.conv1.base_conv.conv.bias",
    "proxNet_B_S.1.layer.0.bn1.num_batches_tracked",
    "proxNet_B_0.layer.0.conv1.g2pa_wgen.0.weight",
    "proxNet_B_0.layer.0.conv1.g2pa_wgen.4.bias",
    "proxNet_B_L.layer.0.bn2.running_var",
]


def published_state(model: RCDNet) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in OURS_TO_PUBLISHED:
            key = re.sub(pattern, repl, key)
        state["module." + key] = value.clone()  # as saved from nn.DataParallel
    return state


def test_published_layout_loads_and_reproduces_outputs():
    source = tiny_model(seed=3).eval()
    scramble_coic(source, std=0.3)
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    state = published_state(source)
    bare = {k[len("module."):] for k in state}
    assert set(PUBLISHED_KEYS) <= bare
    joint = TINY["num_channel"] + 3
    # Published generator: Linear(dim_in + C_in, C_out) first, Linear(16, C_in + C_out + 9) last.
    assert state["module.proxNet_B_0.layer.0.conv1.g2pa_wgen.0.weight"].shape == (joint, TINY["dim_in"] + joint)
    assert state["module.proxNet_M_S.1.layer.0.conv1.g2pa_wgen.4.weight"].shape == (2 * TINY["num_map"] + 9, 16)
    assert state["module.c"].shape == (3, TINY["num_map"], 9, 9)
    assert state["module.m_step"].shape == (TINY["inter_iter"] - 1, 1)

    target = tiny_model(seed=4).eval()
    load_weights(target, state)
    x, z = image(), unit_codes(2, TINY["dim_in"], 5)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        torch.testing.assert_close(target(x, z), source(x, z), rtol=0, atol=0)
    # Our own state_dict loads too (the legacy renaming leaves our names alone).
    load_weights(tiny_model(seed=5), source.state_dict())
