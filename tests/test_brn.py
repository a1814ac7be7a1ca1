"""BRN backbone: the published checkpoints (the contract is in test_models_contract.py)."""
import pytest
import torch
from helpers import reference_file

from models import build_model
from utils.checkpoint import CheckpointError, load_weights


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
