import torch

from models import build_encoder
from utils.checkpoint import load_weights


def test_z_is_unit_norm_and_feature_map_normalised():
    torch.manual_seed(0)
    enc = build_encoder().eval()
    x = torch.rand(3, 3, 48, 48)
    z = enc(x)
    assert z.shape == (3, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    zq, feat = enc.encoder_q(x)
    assert feat.shape == (3, 256, 6, 6)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(3, 6, 6))


def test_contrast_logits_and_momentum():
    torch.manual_seed(0)
    enc = build_encoder(temperature=0.5).eval()  # eval: batch-norm statistics independent of batching
    assert all(not p.requires_grad for p in enc.encoder_k.parameters())
    with torch.no_grad():
        for p in enc.encoder_q.parameters():
            p.add_(0.1)
    before = [p.clone() for p in enc.encoder_k.parameters()]
    q, k, negs = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 3, 3, 32, 32)
    logits, z = enc.contrast(q, k, negs)
    assert logits.shape == (2, 4) and z.shape == (2, 128) and z.requires_grad
    for b, p_k, p_q in zip(before, enc.encoder_k.parameters(), enc.encoder_q.parameters()):
        torch.testing.assert_close(p_k, 0.999 * b + 0.001 * p_q.detach())
    # logit = <q_map, k_map> / (h*w) / T, in [-1/T, 1/T]
    assert logits.abs().max() <= 1 / 0.5 + 1e-6
    _, q_feat = enc.encoder_q(q)
    with torch.no_grad():
        _, k_feat = enc.encoder_k(k)
    expected = (q_feat * k_feat).sum(dim=(1, 2, 3)) / 16 / 0.5
    torch.testing.assert_close(logits[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_published_moco_state_dict_loads():
    src = build_encoder()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    assert any(k.startswith("encoder_q.resblock.0.block.0") for k in state)
    assert any(k.startswith("encoder_k.mlp.2") for k in state)
    dst = load_weights(build_encoder(), {f"module.{k}": v for k, v in state.items()})
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k])
