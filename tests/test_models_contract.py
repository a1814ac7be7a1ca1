"""Every registered backbone meets the contract of ``models/__init__.py`` (checks in ``contract.py``).

Parametrised over ``models.available_models()``: a new backbone is covered by registering it
(and giving its recipe a ``tiny`` configuration), without editing this file.
"""
import pytest

import contract
from models import available_models, build_model

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
