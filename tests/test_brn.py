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


def test_cell_tanh_under_autocast_is_tanh_to_float32_rounding():
    """The cell state's tanh under autocast is 2·sigmoid(2c) - 1: within float32 rounding of tanh
    (checked against float64) with tanh's gradient; float32 throughout keeps torch.tanh itself."""
    from models.brn import _cell_tanh

    c = torch.linspace(-12, 12, 20001, requires_grad=True)
    fast = _cell_tanh(c, torch.bfloat16)
    assert fast.dtype == torch.float32
    assert (fast.double() - torch.tanh(c.detach().double())).abs().max() < 3e-7
    fast.sum().backward()
    expected_grad = 1 - torch.tanh(c.detach().double()) ** 2
    assert (c.grad.double() - expected_grad).abs().max() < 1e-6
    assert torch.equal(_cell_tanh(c.detach(), torch.float32), torch.tanh(c.detach()))
