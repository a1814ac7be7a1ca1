"""DGUNet backbone: stage outputs, stage-loss gradients, shared PReLU, parameter counts, checkpoints.

The contract (both modes, z=None ignores the generators, gradients, sizes) is checked for every
backbone in test_models_contract.py. Forward passes use the recipe's tiny configuration (n_feat=8,
depth=1) on 16 px crops; only the parameter-count test builds the reference configuration
(without running it).
"""
from __future__ import annotations

import pytest
import torch
from contract import tiny_args, tiny_image
from contract import tiny_model as _tiny_model
from helpers import scramble_coic, unit_codes

from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, modulation_parameters
from models.dgunet import DGUNet
from utils.checkpoint import load_weights

TINY = tiny_args("DGUNet").model_hparams  # the recipe's tiny configuration
MODULATED = (ModulatedConv2d, ModulatedConvTranspose2d)


def tiny_model(seed: int = 0, **overrides) -> DGUNet:
    return _tiny_model("DGUNet", seed, **overrides)


def image() -> torch.Tensor:
    return tiny_image("DGUNet")


def test_declares_size_multiple():
    assert DGUNet.size_multiple == 8


# ---- stage composition, against a closed form -------------------------------------
#
# With planted weights every stage image is a fixed 3x3 colour matrix applied to every pixel
# of the rainy input x, and the matrices follow from the published stage formulas alone:
#   phi(u) = (I + A) u,  phi^T(u) = (I + B) u        (centre-tap 1x1 maps, PReLU slope 1)
#   gradient step   y -> y - r * phi^T(phi(y) - x)   (every stage's observation is x)
#   stage image     = the stage's GDM output          (SAM conv2 zeroed)
#   final image     = x + GDM output of the last stage (head convs pass the first 3 channels)


def _centre_identity(conv: torch.nn.Conv2d, channels: int = 3) -> None:
    """Make ``conv`` copy its first ``channels`` input channels to its first output channels."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    c = conv.kernel_size[0] // 2
    for i in range(channels):
        conv.weight[i, i, c, c] = 1.0


def _zero(conv: torch.nn.Conv2d) -> None:
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()


def _plant_operator(operator, matrix: torch.Tensor) -> None:
    """Make an image operator compute ``u + matrix @ u`` per pixel."""
    squeeze, act, expand = operator.body
    _centre_identity(squeeze)
    act.weight.fill_(1.0)  # PReLU with slope 1 is the identity
    _zero(expand)
    c = expand.kernel_size[0] // 2
    expand.weight[:, :3, c, c] = matrix


def _planted_model(depth: int) -> tuple[DGUNet, dict]:
    model = tiny_model(seed=7, depth=depth).eval()
    gen = torch.Generator().manual_seed(11)
    mats = {name: 0.4 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
            for name in ("A0", "B0", "A1", "B1", "A6", "B6")}
    steps = {"r0": 0.3, "r1": 0.7, "r6": 0.45}
    with torch.no_grad():
        _plant_operator(model.phi_0, mats["A0"].float())
        _plant_operator(model.phit_0, mats["B0"].float())
        _plant_operator(model.basic.phi_1, mats["A1"].float())
        _plant_operator(model.basic.phit_1, mats["B1"].float())
        _plant_operator(model.phi_6, mats["A6"].float())
        _plant_operator(model.phit_6, mats["B6"].float())
        model.r0.fill_(steps["r0"])
        model.basic.r1.fill_(steps["r1"])
        model.r6.fill_(steps["r6"])
        _zero(model.sam12.conv2)
        _zero(model.basic.sam23.conv2)
        # Last stage head: shallow conv copies the image, the attention block's residual branch is
        # zero, concat67 keeps only the image channels (drops the SAM features), tail copies them.
        _centre_identity(model.shallow_feat7[0])
        _zero(model.shallow_feat7[1].body[2])
        _centre_identity(model.concat67)
        _centre_identity(model.tail)
    return model, {**mats, **steps}


def _stage_matrices(depth: int, p: dict) -> list[torch.Tensor]:
    """The colour matrices of the stages in stage order (first stage first), float64."""
    eye = torch.eye(3, dtype=torch.float64)

    def step(current, a, b, r):
        # current maps x to the estimate; phi(estimate) - x = ((I + a) current - I) x.
        return current - r * (eye + b) @ ((eye + a) @ current - eye)

    current = step(eye, p["A0"], p["B0"], p["r0"])
    mats = [current]
    for _ in range(depth):
        current = step(current, p["A1"], p["B1"], p["r1"])
        mats.append(current)
    mats.append(eye + step(current, p["A6"], p["B6"], p["r6"]))
    return mats


@pytest.mark.parametrize("depth", [0, 2])
def test_stages_follow_the_gradient_steps_final_first(depth):
    model, planted = _planted_model(depth)
    x = image()
    with torch.no_grad():
        stages = model.forward_stages(x)
        final = model(x)
    expected = [torch.einsum("ij,bjhw->bihw", m, x.double()).float()
                for m in _stage_matrices(depth, planted)]
    assert len(stages) == depth + 2  # first stage, depth middle stages, last stage
    for k, (got, want) in enumerate(zip(stages, expected[::-1])):  # forward_stages is final first
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5,
                                   msg=lambda m, k=k: f"stage {k} (final first): {m}")
    torch.testing.assert_close(final, expected[-1], rtol=0, atol=2e-5)
    for i in range(len(stages)):  # the stages do differ
        for j in range(i):
            assert not torch.allclose(stages[i], stages[j], atol=1e-3), (i, j)


def test_stage_outputs_final_first_with_random_weights():
    model = tiny_model(depth=2).eval()
    x = image()
    z = unit_codes(2, TINY["dim_in"], 0)
    with torch.no_grad():
        for code in (None, z):
            stages = model.forward_stages(x, code)
            assert len(stages) == 2 + 2
            assert all(s.shape == x.shape and torch.isfinite(s).all() for s in stages)
            torch.testing.assert_close(model(x, code), stages[0], rtol=0, atol=0)
            for i in range(len(stages)):
                for j in range(i):
                    assert not torch.allclose(stages[i], stages[j], atol=1e-4), (i, j)


@pytest.mark.parametrize("with_code", [False, True])
def test_backward_reaches_generators_only_with_code(with_code):
    model = tiny_model().train()
    z = unit_codes(2, TINY["dim_in"], 0).requires_grad_(True) if with_code else None
    stages = model.forward_stages(image(), z)
    sum(s.square().mean() for s in stages).backward()

    for name, module in model.named_modules():
        if not isinstance(module, MODULATED):
            continue
        assert module.weight.grad is not None, name
        grads = [p.grad for p in module.generator.parameters()]
        if with_code and module.modulated:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), name
        else:  # no code, or a 1x1 layer whose generator exists only for checkpoints
            assert all(g is None for g in grads), name
    for name in ("r0", "r6"):
        assert getattr(model, name).grad is not None
    assert model.basic.r1.grad is not None
    if with_code:
        assert z.grad is not None and z.grad.abs().sum() > 0


def test_parameter_count_matches_reference():
    # Counts of the published DGUNet_CoIM at depth=5, dim_in=128 (measured by
    # instantiating the published code; its shared PReLU counts once).
    model = DGUNet()
    total = sum(p.numel() for p in model.parameters())
    generators = sum(p.numel() for p in modulation_parameters(model))
    assert total == pytest.approx(5_256_739, rel=5e-3)
    assert generators == pytest.approx(1_623_622, rel=5e-3)


def test_first_and_last_stage_share_their_prelu():
    model = tiny_model()
    assert model.shallow_feat1[1].body[1] is model.shallow_feat7[1].body[1]
    assert model.basic.shallow_feat2[1].body[1] is not model.shallow_feat1[1].body[1]


# ---- checkpoints --------------------------------------------------------------------

# Names read off the published DGUNet_CoIM (TConv -> base_conv.conv / g2pa_wgen).
PUBLISHED_KEYS = [
    "r0", "r6", "basic.r1",
    "phit_6.body.1.weight",
    "phi_0.body.0.base_conv.conv.bias",
    "shallow_feat1.1.body.1.weight",
    "shallow_feat7.1.CA.conv_du.2.weight",
    "sam12.conv2.base_conv.conv.weight",
    "stage1_encoder.body.1.norm.weight",
    "stage1_encoder.body.3.identity.base_conv.conv.bias",
    "stage1_decoder.skip_conv.2.base_conv.conv.weight",
    "basic.stage2_encoder.body.0.csff_enc.base_conv.conv.weight",
    "basic.stage2_encoder.body.2.gamma.g2pa_wgen.2.bias",
    "basic.stage2_encoder.body.2.downsample.base_conv.conv.weight",
    "basic.stage2_decoder.body.2.up.base_conv.conv.bias",
    "basic.stage2_decoder.body.0.up.g2pa_wgen.4.weight",
    "basic.stage2_decoder.body.1.conv_block.conv_2.base_conv.conv.weight",
    "basic.merge12.subnet.g2pa_wgen.0.weight",
    "basic.merge12.conv_block.base_conv.conv.bias",
    "concat67.g2pa_wgen.2.bias",
    "tail.base_conv.conv.weight",
]
# Layers the published model does not have: no CSFF in stage 1 or at the bottom level,
# bias-free head and down-sampling convs.
ABSENT_KEYS = [
    "stage1_encoder.body.0.csff_enc.base_conv.conv.weight",
    "basic.stage2_encoder.body.3.csff_enc.base_conv.conv.weight",
    "tail.base_conv.conv.bias",
    "stage1_encoder.body.0.downsample.base_conv.conv.bias",
    "basic.stage2_decoder.body.0.conv_block.norm.weight",
]


def published_state(model: DGUNet) -> dict:
    """Our state_dict renamed to the published TConv layout via an explicit per-layer table."""
    table = []
    for name, module in model.named_modules():
        if isinstance(module, MODULATED):
            table.append((f"{name}.weight", f"{name}.base_conv.conv.weight"))
            table.append((f"{name}.bias", f"{name}.base_conv.conv.bias"))
            table.append((f"{name}.generator.", f"{name}.g2pa_wgen."))
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in table:
            if key == ours or (ours.endswith(".") and key.startswith(ours)):
                key = theirs + key[len(ours):]
                break
        state["module." + key] = value.clone()
    return state


def test_published_layout_loads_and_reproduces_outputs():
    source = tiny_model(seed=3).eval()
    scramble_coic(source, std=0.3)
    state = published_state(source)
    bare = {k[len("module."):] for k in state}
    missing = [k for k in PUBLISHED_KEYS if k not in bare]
    assert not missing
    assert not [k for k in ABSENT_KEYS if k in bare]

    n, s = TINY["n_feat"], TINY["scale_unetfeats"]
    shape = lambda key: tuple(state["module." + key].shape)  # noqa: E731
    # ConvTranspose weights are (C_in, C_out, k, k); the first up-block goes 4 -> 3 levels.
    assert shape("basic.stage2_decoder.body.0.up.base_conv.conv.weight") == (n + 3 * s, n + 2 * s, 2, 2)
    assert shape("stage1_encoder.body.0.downsample.base_conv.conv.weight") == (n + s, n + s, 4, 4)
    assert shape("stage1_encoder.body.0.norm.weight") == ((n + s) // 2,)
    assert shape("basic.merge12.subnet.base_conv.conv.weight") == (16, 2 * n, 3, 3)
    assert shape("tail.base_conv.conv.weight") == (3, n + TINY["scale_orsnetfeats"], 3, 3)
    # A 1x1 TConv still carries a generator: Linear(dim_in + C_in, C_out) ... Linear(16, C_in + C_out + 1).
    assert shape("sam12.conv1.g2pa_wgen.4.weight") == (2 * n + 1, 16)

    target = tiny_model(seed=4).eval()
    load_weights(target, state)
    x, z = image(), unit_codes(2, TINY["dim_in"], 5)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        torch.testing.assert_close(target(x, z), source(x, z), rtol=0, atol=0)
