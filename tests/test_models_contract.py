"""Every registered backbone meets the contract of ``models/__init__.py`` (checks in ``contract.py``).

Parametrised over ``models.available_models()``: a new backbone is covered by registering it
(and giving its recipe a ``tiny`` configuration), without editing this file.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import contract
from helpers import unit_codes
from models import available_models, build_model, model_class

NAMES = available_models()


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """(name, dim_in, x): a backbone, its code size and images at its recipe's tiny crop."""
    name = request.param
    return name, contract.tiny_args(name).dim_in, contract.tiny_image(name)


def test_forward_both_modes(case):
    name, dim_in, x = case
    contract.check_forward_both_modes(contract.tiny_model(name), x, dim_in)


def test_none_ignores_generators(case):
    name, dim_in, x = case
    contract.check_none_ignores_generators(contract.tiny_model(name), x, dim_in)


def test_gradients_reach_generators_only_with_code(case):
    name, dim_in, x = case
    contract.check_gradients_reach_generators_only_with_code(contract.tiny_model(name), x, dim_in)


def test_size_multiple_padded_or_tiled(case):
    name, dim_in, x = case
    contract.check_size_multiple(contract.tiny_model(name), x, dim_in)


def test_checkpoint_round_trip(case):
    name, dim_in, x = case
    contract.check_checkpoint_round_trip(name, x, dim_in)


def test_registry_lists_names_on_unknown():
    with pytest.raises(ValueError, match="BRN, RCDNet, DGUNet, IDT, DRSformer"):
        build_model("UNet")
    with pytest.raises(ValueError, match="BRN"):
        build_model("BRN", depth=3)
    assert available_models()[0] == "BRN"


def test_channels_last_declarations_are_booleans_and_not_all_absent():
    # A backbone says it keeps channels-last throughout (``channels_last_throughout``); the test below
    # holds it to that. It must never be vacuous, and a typo ("yes") must not pass for True.
    declared = {n: getattr(model_class(n), "channels_last_throughout", False) for n in NAMES}
    assert all(isinstance(v, bool) for v in declared.values()), declared
    assert any(declared.values()), "no backbone declares channels_last_throughout"


class _ConvInputs(TorchDispatchMode):
    """Records the input maps of every convolution run inside it."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("convolution", "conv2d", "conv_transpose2d"):
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["plain", "coic"])
@pytest.mark.parametrize("name", [n for n in NAMES if getattr(model_class(n), "channels_last_throughout", False)])
def test_a_channels_last_model_stays_channels_last(name, mode):
    # A photo is batch 1. A map that PyTorch no longer reads as channels-last (a batch stride of C,
    # default-layout zeros, instance norm's output) makes every concatenation with it fall back to
    # the default layout, and the next convolution copies the whole map back: BRN's, DGUNet's and
    # DRSformer's CoIC forwards in bf16 took 1.2 to 2 times their plain ones. The probe is PyTorch's
    # own reading: a concatenation of a map with itself must come out channels-last.
    model = contract.tiny_model(name).eval().to(memory_format=torch.channels_last)
    x = contract.tiny_image(name, batch=1).contiguous(memory_format=torch.channels_last)
    z = unit_codes(1, contract.tiny_args(name).dim_in, seed=0) if mode == "coic" else None
    spy = _ConvInputs()
    with torch.no_grad(), spy:
        model(x, z)
    maps = [t for t in spy.inputs if t.shape[-1] * t.shape[-2] > 1 and t.shape[1] > 1]
    assert maps, "no convolution seen"
    dropped = [tuple(t.shape) for t in maps
               if not torch.cat([t, t], 1).is_contiguous(memory_format=torch.channels_last)]
    assert not dropped, f"{name} {mode}: {len(dropped)} of {len(maps)} convolutions read default-layout maps {dropped[:4]}"
