"""The backbone contract as reusable checks (``models/__init__.py`` states it).

``tests/test_models_contract.py`` runs them over the registry; any test can run them on a model
of its own (``tests/test_toy_backbone.py`` does, on a backbone registered at run time). Every
check takes a model built by ``tiny_model`` (the recipe's ``--tiny`` configuration) and images
of the recipe's tiny crop, so the same checks fit every backbone.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
from helpers import coic_parameters, scramble_coic, unit_codes

from models import build_model, size_multiple, tile_size
from models.coim import (
    ContextEmbedding,
    ModulatedConv2d,
    ModulatedConvTranspose2d,
    context_embedding_parameters,
    modulation_parameters,
)
from utils.checkpoint import load_weights
from utils.eval.inference import restore
from utils.train.config import parse_train_args

MODULATED = (ModulatedConv2d, ModulatedConvTranspose2d)


def tiny_args(name: str) -> argparse.Namespace:
    """``train_<name>.py --tiny`` parsed: model hyper-parameters, batch and crop of the tiny run."""
    return parse_train_args(name, ["--tiny"])


def tiny_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """Backbone ``name`` in its recipe's tiny configuration (``overrides`` replace hyper-parameters)."""
    torch.manual_seed(seed)
    return build_model(name, **{**tiny_args(name).model_hparams, **overrides})


def tiny_image(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """(batch, 3, crop, crop) in [0, 1] at the recipe's tiny crop, reproducible from ``seed``."""
    size = tiny_args(name).crop_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the checks ---------------------------------------------------------------------

def check_forward_both_modes(model: nn.Module, x: torch.Tensor, dim_in: int) -> None:
    """Output (B,3,H,W) like x, finite; z changes it, per sample; different codes differ."""
    model.eval()
    z1, z2 = unit_codes(x.shape[0], dim_in, 2), unit_codes(x.shape[0], dim_in, 3)
    with torch.no_grad():
        plain, mod1, mod2 = model(x), model(x, z1), model(x, z2)
        mixed = model(x, torch.cat([z1[:1], z2[1:]]))
    for out in (plain, mod1, mod2):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
    # Even the near-neutral default init of the generators moves the output.
    assert not torch.allclose(plain, mod1, atol=1e-6)
    assert not torch.allclose(mod1, mod2, atol=1e-6)
    # Modulation is per sample: changing sample 1's code leaves sample 0 alone.
    torch.testing.assert_close(mixed[0], mod1[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], mod2[1], rtol=1e-5, atol=1e-5)


def check_none_ignores_generators(model: nn.Module, x: torch.Tensor, dim_in: int) -> None:
    """z=None is the plain backbone: scrambling every CoIC weight leaves it bitwise unchanged,
    while with a code the same scrambling changes the output, and codes tell apart."""
    model.eval()
    other = copy.deepcopy(model)
    scramble_coic(other)
    z_a, z_b = unit_codes(x.shape[0], dim_in, 0), unit_codes(x.shape[0], dim_in, 1)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(other(x), reference)
        a, b = other(x, z_a), other(x, z_b)
        assert not torch.allclose(a, b, atol=1e-4)
        assert not torch.allclose(a, reference, atol=1e-4)
        assert not torch.allclose(a, model(x, z_a), atol=1e-5)
        scramble_coic(other, std=2.0)
        assert torch.equal(other(x), reference)


def check_gradients_reach_generators_only_with_code(model: nn.Module, x: torch.Tensor, dim_in: int) -> None:
    """On the training path: without z every backbone parameter and no CoIC parameter gets a
    gradient; with z every used generator and context embedding gets a finite one, non-zero
    somewhere (1x1 layers, whose generator exists only for checkpoints, get none), and so does z."""
    coic = {id(p) for p in coic_parameters(model)}
    base = [(n, p) for n, p in model.named_parameters() if id(p) not in coic]
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        assert all(p.grad is None for p in coic_parameters(model))
        missing = [n for n, p in base if p.grad is None]
        assert not missing, missing

        model.zero_grad(set_to_none=True)
        z = unit_codes(x.shape[0], dim_in, 5).requires_grad_(True)
        model(x, z).square().mean().backward()
        for name, m in model.named_modules():
            if isinstance(m, MODULATED):
                assert m.weight.grad is not None, name
                grads = [p.grad for p in m.generator.parameters()] if m.generator is not None else []
                if m.modulated:
                    assert all(g is not None and torch.isfinite(g).all() for g in grads), name
                else:
                    assert all(g is None for g in grads), name
            elif isinstance(m, ContextEmbedding):
                assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), name
        # (Some gradients are exactly zero: BRN's forget gate at inter_iter=1 multiplies a zero cell.)
        assert any(p.grad.abs().sum() > 0 for p in modulation_parameters(model) if p.grad is not None)
        context = context_embedding_parameters(model)
        if context:
            assert any(p.grad.abs().sum() > 0 for p in context)
        assert z.grad is not None and z.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def check_size_multiple(model: nn.Module, x: torch.Tensor, dim_in: int) -> None:
    """The backbone declares ``size_multiple`` (and maybe ``tile_size``); ``restore`` pads or tiles
    any size from that alone: odd sizes come back at their own shape, clamped to [0,1]."""
    model.eval()
    assert hasattr(model, "size_multiple"), f"{type(model).__name__} declares no size_multiple"
    multiple = size_multiple(model)
    tile = tile_size(model)
    assert isinstance(multiple, int) and multiple >= 1
    z = unit_codes(1, dim_in, 7)
    with torch.no_grad():
        if tile is None:  # one multiple larger runs directly
            bigger = torch.rand(1, 3, x.shape[-2] + multiple, x.shape[-1] + multiple)
            assert model(bigger, z).shape == bigger.shape
        if multiple == 1 and tile is None:  # no down-sampling: odd sizes run directly
            assert model(torch.rand(1, 3, 13, 11)).shape == (1, 3, 13, 11)
        h, w = x.shape[-2], x.shape[-1]
        for shape in ((1, 3, h + 3, w + 1), (1, 3, h - 1, 2 * w + 5)):
            image = torch.rand(*shape)
            for code in (None, z):
                y = restore(model, image, code, overlap=min(16, h // 4))
                assert y.shape == image.shape and torch.isfinite(y).all()
                assert 0 <= float(y.min()) and float(y.max()) <= 1


def check_checkpoint_round_trip(name: str, x: torch.Tensor, dim_in: int) -> None:
    """Our state_dict, bare or saved from nn.DataParallel (``module.``), reproduces both modes exactly."""
    source = tiny_model(name, seed=3).eval()
    scramble_coic(source, std=0.3)
    z = unit_codes(x.shape[0], dim_in, 5)
    for prefix in ("", "module."):
        target = tiny_model(name, seed=4).eval()
        load_weights(target, {prefix + k: v.clone() for k, v in source.state_dict().items()})
        with torch.no_grad():
            torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
            torch.testing.assert_close(target(x, z), source(x, z), rtol=0, atol=0)


def check_contract(name: str) -> None:
    """Every check above on backbone ``name`` in its tiny configuration."""
    dim_in = tiny_args(name).dim_in
    x = tiny_image(name)
    check_forward_both_modes(tiny_model(name), x, dim_in)
    check_none_ignores_generators(tiny_model(name), x, dim_in)
    check_gradients_reach_generators_only_with_code(tiny_model(name), x, dim_in)
    check_size_multiple(tiny_model(name), x, dim_in)
    check_checkpoint_round_trip(name, x, dim_in)
