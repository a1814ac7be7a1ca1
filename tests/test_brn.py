import pytest
import torch

from conftest import reference_file
from models import available_models, build_model
from utils.checkpoint import CheckpointError, load_weights


def test_forward_both_modes_and_backward():
    torch.manual_seed(0)
    model = build_model("BRN", inter_iter=2)
    x = torch.rand(2, 3, 12, 12)
    z = torch.nn.functional.normalize(torch.randn(2, 128), dim=1)
    plain, modulated = model(x), model(x, z)
    assert plain.shape == modulated.shape == x.shape
    assert torch.isfinite(modulated).all()
    assert not torch.allclose(plain, modulated)
    modulated.mean().backward()
    assert model.conv0.conv.generator[0].weight.grad is not None


def test_registry_lists_names_on_unknown():
    with pytest.raises(ValueError, match="BRN, RCDNet, DGUNet, IDT, DRSformer"):
        build_model("UNet")
    with pytest.raises(ValueError, match="BRN"):
        build_model("BRN", depth=3)
    assert available_models()[0] == "BRN"


def test_official_outputs_match():
    ref = torch.load(reference_file("brn_official_outputs.pt"), map_location="cpu")
    coic = load_weights(build_model("BRN"), reference_file("brn_coic_official.pth")).eval()
    baseline = load_weights(build_model("BRN", dim_in=0), reference_file("brn_baseline_official.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(coic(ref["x"]), ref["coic_weights_normal"], atol=1e-5, rtol=0)
        torch.testing.assert_close(coic(ref["x"], ref["z"]), ref["coic_weights_tran"], atol=1e-5, rtol=0)
        torch.testing.assert_close(baseline(ref["x"]), ref["baseline_weights_normal"], atol=1e-5, rtol=0)


def test_baseline_file_does_not_fit_coic_model():
    with pytest.raises(CheckpointError, match="missing keys"):
        load_weights(build_model("BRN"), reference_file("brn_baseline_official.pth"))
