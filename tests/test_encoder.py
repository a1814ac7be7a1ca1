import pytest
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


def _differing_encoder(temperature=0.5):
    torch.manual_seed(0)
    enc = build_encoder(temperature=temperature).eval()  # eval: batch-norm independent of batching
    with torch.no_grad():
        for p in enc.encoder_q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def test_inference_code_comes_from_the_key_encoder():
    enc = _differing_encoder()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = enc(x)
        z_key, z_query = enc.encoder_k(x)[0], enc.encoder_q(x)[0]
    assert not torch.allclose(z_key, z_query, atol=1e-3)
    torch.testing.assert_close(z, z_key)


def test_every_logit_against_a_per_sample_loop():
    enc = _differing_encoder(temperature=0.5)
    b, n = 3, 4
    gen = torch.Generator().manual_seed(3)
    q, k = torch.rand(b, 3, 32, 32, generator=gen), torch.rand(b, 3, 32, 32, generator=gen)
    negs = torch.rand(b, n, 3, 32, 32, generator=gen)
    logits, _ = enc.contrast(q, k, negs)
    # keys come from the key encoder as updated by this step (the momentum update runs first)
    with torch.no_grad():
        for i in range(b):
            _, qf = enc.encoder_q(q[i:i + 1])
            keys = [k[i:i + 1]] + [negs[i, j:j + 1] for j in range(n)]
            for j, key in enumerate(keys):
                _, kf = enc.encoder_k(key)
                expected = float((qf * kf).sum()) / (qf.shape[-2] * qf.shape[-1]) / 0.5
                assert float(logits[i, j]) == pytest.approx(expected, rel=1e-4, abs=1e-5), (i, j)


def _published_moco_keys(width: int = 32, dim: int = 128) -> dict:
    """The published ``MoCo`` state_dict layout (contrastive.py of the CoIC code), name -> shape."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    table = {"conv1.weight": (width, 3, 3, 3), "conv1.bias": (width,)}
    for i in range(3):
        c_in, c_out = width * 2 ** i, width * 2 ** (i + 1)
        r = f"resblock.{i}"
        table[f"{r}.block.0.weight"] = (c_out, c_in, 3, 3)
        table.update(bn(f"{r}.block.1", c_out))
        table[f"{r}.block.3.weight"] = (c_out, c_out, 3, 3)
        table[f"{r}.block.3.bias"] = (c_out,)
        table.update(bn(f"{r}.block.4", c_out))
        table[f"{r}.short_cut.0.weight"] = (c_out, c_in, 1, 1)
        table.update(bn(f"{r}.short_cut.1", c_out))
    table.update({"mlp.0.weight": (dim, 8 * width), "mlp.0.bias": (dim,), "mlp.2.weight": (dim, dim),
                  "mlp.2.bias": (dim,)})
    return {f"module.{side}.{k}": v for side in ("encoder_q", "encoder_k") for k, v in table.items()}


def test_published_layout_with_data_parallel_prefix_loads_by_name():
    gen = torch.Generator().manual_seed(0)
    published = {}
    for name, shape in _published_moco_keys().items():
        published[name] = (torch.randint(0, 100, shape, generator=gen) if name.endswith("num_batches_tracked")
                           else torch.randn(shape, generator=gen))
    enc = load_weights(build_encoder(), published)
    own = enc.state_dict()
    assert len(own) == len(published)
    for name, value in published.items():
        assert torch.equal(own[name[len("module."):]], value), name
