"""DRSformer backbone: sparse attention, parameter counts, reference size and published names.

The contract (both modes, z=None ignores the generators, gradients, sizes) is checked for every
backbone in test_models_contract.py; models here are the recipe's tiny configuration.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.coim import modulation_parameters
from models.coim import context_embedding_parameters
from models.drsformer import DRSformer, TopKSparseAttention
from contract import tiny_args, tiny_model
from utils.checkpoint import load_weights

TINY = tiny_args("DRSformer").model_hparams  # the recipe's tiny configuration


@pytest.fixture(scope="module")
def model() -> DRSformer:
    return tiny_model("DRSformer").eval()


def test_topk_attention_matches_threshold_formula() -> None:
    torch.manual_seed(0)
    attn = TopKSparseAttention(dim=20, num_heads=2, bias=True)
    with torch.no_grad():
        attn.mix.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x, kv = torch.randn(2, 20, 4, 5), torch.randn(2, 20, 4, 5)
    with torch.no_grad():
        q, k, v = attn.qkv_dwconv(torch.cat([attn.to_q(x), attn.to_kv(kv)], 1)).chunk(3, 1)
        q, k, v = (t.reshape(2, 2, 10, 20) for t in (q, k, v))
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * attn.temperature
        ranked = logits.sort(dim=-1, descending=True).values
        expected = 0
        # C = 10 channels per head -> keep 5, 6, 7 and 8 keys per query.
        for weight, keep in zip(attn.mix, (5, 6, 7, 8)):
            kept = logits.where(logits >= ranked[..., keep - 1:keep], torch.tensor(float("-inf")))
            assert (kept.isfinite().sum(-1) == keep).all()
            expected = expected + weight * kept.softmax(-1) @ v
        expected = attn.project_out(expected.reshape(2, 20, 4, 5))
        torch.testing.assert_close(attn(x, kv), expected)


def test_reference_parameter_counts() -> None:
    """Counts of the published CoIC DRSformer (measured from the published code)."""
    net = DRSformer()
    total = sum(p.numel() for p in net.parameters())
    coim = sum(p.numel() for p in modulation_parameters(net))
    context = sum(p.numel() for p in context_embedding_parameters(net))
    assert total == 47_794_309
    assert coim == 13_208_261
    assert context == 916_416
    assert total == pytest.approx(47.79e6, rel=5e-3)
    assert coim + context == pytest.approx(14.12e6, rel=5e-3)


def test_size_contract() -> None:
    net = build_model("DRSformer", **TINY)
    assert isinstance(net, DRSformer)
    assert DRSformer.size_multiple == 8 and DRSformer.tile_size is None
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="LayerNorm_type"):
        DRSformer(LayerNorm_type="Batch", **TINY)


# Published CoIC key -> ours. Names read from the published models/DRSformer_CoIM.py and
# models/CoIM.py (MEFC expert order: sep 1/3/5/7, dil 3/5/7, avg-pool).
PUBLISHED_NAMES = {
    "patch_embed.proj.base_conv.conv.weight": "patch_embed.weight",
    "patch_embed.proj.g2pa_wgen.0.weight": "patch_embed.generator.0.weight",
    "encoder_level0.layers.0.ca_fc.2.bias": "encoder_level0.router.2.bias",
    "encoder_level0.layers.1.preprocess.op.0.weight": "encoder_level0.entry.weight",
    "encoder_level0.layers.1._ops.2._ops.3.op.3.base_conv.conv.weight": "encoder_level0.stages.2.experts.3.dw2.weight",
    "encoder_level0.layers.1._ops.0._ops.1.op.4.weight": "encoder_level0.stages.0.experts.1.pw2.weight",
    "refinement.layers.1._ops.1._ops.5.op.0.g2pa_wgen.4.bias": "refinement.stages.1.experts.5.dw.generator.4.bias",
    "refinement.layers.1._ops.0._ops.6.op.1.weight": "refinement.stages.0.experts.6.pw.weight",
    "refinement.layers.1._ops.3._out.0.weight": "refinement.stages.3.fuse.weight",
    "encoder_level1.0.norm1_q.body.weight": "encoder_level1.0.norm1_q.weight",
    "encoder_level1.0.norm1_kv.body.bias": "encoder_level1.0.norm1_kv.bias",
    "latent.0.context_emb.1.bias": "latent.0.context_emb.proj.bias",
    "latent.0.attn.temperature": "latent.0.attn.temperature",
    "down1_2.body.0.g2pa_wgen.0.weight": "down1_2.conv.generator.0.weight",
    "up2_1.body.0.base_conv.conv.weight": "up2_1.conv.weight",
    "decoder_level1.0.ffn.dwconv5x5_1.g2pa_wgen.2.weight": "decoder_level1.0.ffn.dwconv5x5_1.generator.2.weight",
    "module.output.base_conv.conv.weight": "output.weight",
}


def test_published_key_names_load(model: DRSformer) -> None:
    ours = model.state_dict()
    published_style = dict(ours)
    for theirs, mine in PUBLISHED_NAMES.items():
        published_style[theirs] = published_style.pop(mine).clone() + 1.0
    # Upstream keeps the four top-k blend weights as separate 1-element parameters.
    mix = published_style.pop("encoder_level2.0.attn.mix")
    for i in range(4):
        published_style[f"encoder_level2.0.attn.attn{i + 1}"] = torch.tensor([0.5 + i])
    fresh = DRSformer(**TINY)
    load_weights(fresh, published_style)
    loaded = fresh.state_dict()
    for theirs, mine in PUBLISHED_NAMES.items():
        torch.testing.assert_close(loaded[mine], published_style[theirs])
    torch.testing.assert_close(loaded["encoder_level2.0.attn.mix"], torch.tensor([0.5, 1.5, 2.5, 3.5]))
    assert mix.shape == (4,)
    # Our own layout passes through the renaming unchanged.
    load_weights(fresh, ours)
    reloaded = fresh.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(reloaded[key], value)
