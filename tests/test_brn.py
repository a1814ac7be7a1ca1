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


@pytest.mark.parametrize("dim_in", [0, 16])
def test_hidden_state_in_the_autocast_dtype_cell_state_in_float32(dim_in):
    """Under bf16 autocast each branch hands on its image and hidden state h in bf16 and keeps its
    cell state c in float32 (a float32 zero h promoted h, every concatenation and residual sum to
    float32); without autocast all three are float32."""
    torch.manual_seed(0)
    model = build_model("BRN", inter_iter=2, dim_in=dim_in, width=8).eval()
    x = torch.rand(1, 3, 12, 12)
    z = torch.randn(1, dim_in) if dim_in else None
    bf16, fp32 = torch.bfloat16, torch.float32
    for autocast, expected in ((True, [bf16, bf16, fp32]), (False, [fp32, fp32, fp32])):
        seen = []
        hooks = [branch.register_forward_hook(lambda m, args, out, seen=seen: seen.append([t.dtype for t in out]))
                 for branch in model._branches.values()]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            model(x, z)
        for hook in hooks:
            hook.remove()
        assert len(seen) == 2 * 2 and all(dtypes == expected for dtypes in seen), (autocast, seen)
