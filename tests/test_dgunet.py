"""DGUNet backbone: stage outputs, stage-loss gradients, shared PReLU, parameter counts, checkpoints.

The contract (both modes, z=None ignores the generators, gradients, sizes) is checked for every
backbone in test_models_contract.py. Forward passes use the recipe's tiny configuration (n_feat=8,
depth=1) on 16 px crops; only the parameter-count test builds the reference configuration
(without running it).
"""
from __future__ import annotations


import pytest
import torch

from contract import tiny_args, tiny_image, tiny_model as _tiny_model, unit_codes
from conftest import scramble_generators
from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, modulation_parameters
from models.dgunet import DGUNet, _gradient_step
from utils.checkpoint import load_weights

TINY = tiny_args("DGUNet").model_hparams  # the recipe's tiny configuration
MODULATED = (ModulatedConv2d, ModulatedConvTranspose2d)


def tiny_model(seed: int = 0, **overrides) -> DGUNet:
    return _tiny_model("DGUNet", seed, **overrides)


def image() -> torch.Tensor:
    return tiny_image("DGUNet")


def test_declares_size_multiple():
    assert DGUNet.size_multiple == 8


def stages_by_hand(model: DGUNet, x: torch.Tensor, z=None) -> list[torch.Tensor]:
    """The stage images in stage order (first stage first), assembled from the sub-modules."""
    image = _gradient_step(model.phi_0, model.phit_0, model.r0, x, x, z)
    skips, bottom = model.stage1_encoder(model.shallow_feat1(image, z), z)
    decoded = model.stage1_decoder(bottom, skips, z)
    sam_feats, image = model.sam12(decoded[-1], image, z)
    stages = [image]
    for _ in range(model.depth):
        sam_feats, image, skips, decoded = model.basic(x, image, skips, decoded, sam_feats, z)
        stages.append(image)
    image = _gradient_step(model.phi_6, model.phit_6, model.r6, image, x, z)
    feats = model.concat67(torch.cat([model.shallow_feat7(image, z), sam_feats], dim=1), z)
    stages.append(x + model.tail(feats, z))
    return stages


def test_stage_outputs_final_first():
    model = tiny_model(depth=2).eval()
    x = image()
    z = unit_codes(2, TINY["dim_in"], 0)
    with torch.no_grad():
        for code in (None, z):
            stages = model.forward_stages(x, code)
            final = model(x, code)
            by_hand = stages_by_hand(model, x, code)
            assert len(stages) == 2 + 2  # first stage, depth middle stages, last stage
            assert all(s.shape == x.shape and torch.isfinite(s).all() for s in stages)
            # forward is the LAST stage (the residual of the last stage's tail on the rainy input),
            # and forward_stages lists the stages final first.
            torch.testing.assert_close(final, by_hand[-1], rtol=0, atol=0)
            for got, expected in zip(stages, by_hand[::-1]):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
            assert not torch.allclose(final, by_hand[0], atol=1e-4)  # the stages do differ


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
    scramble_generators(source, std=0.3)
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
