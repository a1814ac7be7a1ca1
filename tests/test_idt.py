"""IDT backbone: context embeddings, parameter counts, reference size, published-checkpoint names.

The contract (both modes, z=None ignores the generators, gradients, sizes) is checked for every
backbone in test_models_contract.py; models here are the recipe's tiny configuration.
"""
from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.coim import modulation_parameters
from models.coim import ContextEmbedding, context_embedding_parameters
from models.idt import IDT, LocallyEnhancedFeedForward
from contract import tiny_args, tiny_model
from utils.checkpoint import load_weights

TINY = tiny_args("IDT").model_hparams  # the recipe's tiny configuration


@pytest.fixture(scope="module")
def model() -> IDT:
    return tiny_model("IDT").eval()


def test_context_embeddings_are_found_by_type(model: IDT) -> None:
    embeddings = [m for m in model.modules() if isinstance(m, ContextEmbedding)]
    # One per block: 9 stages x (1 window block) + 8 spatial blocks.
    assert len(embeddings) == 17
    assert sum(p.numel() for p in context_embedding_parameters(model)) == sum(
        p.numel() for m in embeddings for p in m.parameters())


def test_reference_parameter_counts() -> None:
    """Counts of the published CoIC IDT (measured from the published code)."""
    net = IDT()
    total = sum(p.numel() for p in net.parameters())
    coim = sum(p.numel() for p in modulation_parameters(net))
    context = sum(p.numel() for p in context_embedding_parameters(net))
    assert total == 18_953_632
    assert coim == 1_953_169
    assert context == 577_920
    assert total == pytest.approx(18.95e6, rel=5e-3)
    assert coim + context == pytest.approx(2.53e6, rel=5e-3)


def test_size_contract() -> None:
    net = build_model("IDT", **TINY)
    assert isinstance(net, IDT)
    assert net.tile_size == 64 and net.size_multiple == 64
    assert IDT.tile_size == 128 and IDT.size_multiple == 128
    with pytest.raises(ValueError, match="runs only at 64x64"):
        net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="img_size 96"):
        IDT(img_size=96, embed_dim=4, depths=[1] * 9, num_heads=[1] * 9)


# Published CoIC key -> ours, for the tiny configuration (depth 1: blocks.1 is the
# spatial block). Names read from the published models/IDT_CoIM.py and models/CoIM.py.
PUBLISHED_NAMES = {
    "input_proj.proj.0.base_conv.conv.weight": "input_proj.weight",
    "input_proj.proj.0.g2pa_wgen.0.weight": "input_proj.generator.0.weight",
    "module.output_proj.proj.0.base_conv.conv.bias": "output_proj.bias",
    "dowsample_0.conv.0.base_conv.conv.weight": "downs.0.conv.weight",
    "dowsample_3.conv.0.g2pa_wgen.4.bias": "downs.3.conv.generator.4.bias",
    "upsample_0.deconv.0.base_conv.conv.weight": "ups.0.conv.weight",
    "upsample_3.deconv.0.g2pa_wgen.2.weight": "ups.3.conv.generator.2.weight",
    "encoderlayer_0.blocks.0.norm1_kv.weight": "encoders.0.blocks.0.norm1_kv.weight",
    "encoderlayer_0.blocks.0.context_emb.1.weight": "encoders.0.blocks.0.context_emb.proj.weight",
    "encoderlayer_0.blocks.0.attn.qkv.to_q.weight": "encoders.0.blocks.0.attn.to_q.weight",
    "encoderlayer_0.blocks.0.attn.qkv.to_kv.bias": "encoders.0.blocks.0.attn.to_kv.bias",
    "encoderlayer_0.blocks.0.attn.qkv.proj.weight": "encoders.0.blocks.0.attn.to_pos.weight",
    "encoderlayer_0.blocks.0.attn.proj.weight": "encoders.0.blocks.0.attn.proj.weight",
    "encoderlayer_2.blocks.1.attn.Position_Extract.0.weight": "encoders.2.blocks.1.attn.pos_conv.0.weight",
    "encoderlayer_2.blocks.1.attn.relative_position_bias_table":
        "encoders.2.blocks.1.attn.relative_position_bias_table",
    "bottle.blocks.0.context_emb.1.bias": "bottleneck.blocks.0.context_emb.proj.bias",
    "decoderlayer_3.blocks.0.mlp.linear1.0.weight": "decoders.3.blocks.0.mlp.fc1.weight",
    "decoderlayer_3.blocks.0.mlp.dwconv.0.base_conv.conv.weight": "decoders.3.blocks.0.mlp.dwconv.weight",
    "decoderlayer_3.blocks.1.mlp.dwconv.0.g2pa_wgen.0.bias": "decoders.3.blocks.1.mlp.dwconv.generator.0.bias",
    "decoderlayer_3.blocks.1.mlp.linear2.0.bias": "decoders.3.blocks.1.mlp.fc2.bias",
}


def test_published_key_names_load(model: IDT) -> None:
    ours = model.state_dict()
    assert not any("relative_position_index" in k for k in ours)  # not persistent upstream either
    assert ours["encoders.0.blocks.1.attn.relative_position_bias_table"].shape == ((2 * 16 - 1) ** 2, 1)
    assert ours["decoders.1.blocks.1.attn.relative_position_bias_table"].shape == ((2 * 4 - 1) ** 2, 1)
    published_style = dict(ours)
    for theirs, mine in PUBLISHED_NAMES.items():
        published_style[theirs] = published_style.pop(mine).clone() + 1.0
    fresh = IDT(**TINY)
    load_weights(fresh, published_style)
    loaded = fresh.state_dict()
    for theirs, mine in PUBLISHED_NAMES.items():
        torch.testing.assert_close(loaded[mine], published_style[theirs])
    # Our own layout passes through the renaming unchanged.
    load_weights(fresh, ours)
    reloaded = fresh.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(reloaded[key], value)


class _Copies(TorchDispatchMode):
    """Counts the whole-map copies (copy_ and clone) run inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("copy_", "clone"):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("z", [None, "code"])
def test_leff_copies_the_map_only_in_the_default_layout(z):
    # The tokens are a channels-last map. A default-layout LeFF copies them to channels-first for
    # its depthwise conv (faster there); a channels-last one must use them as they are (IDT in
    # channels-last at 128², one thread: fp32 0.97 -> 0.61 s). The outputs agree.
    torch.manual_seed(0)
    leff = LocallyEnhancedFeedForward(8, 16, dim_in=5).eval()
    with torch.no_grad():
        for p in leff.dwconv.generator.parameters():
            p.normal_()
    x = torch.randn(1, 36, 8)
    code = torch.nn.functional.normalize(torch.randn(1, 5), dim=1) if z else None
    maps = []
    for layout in (torch.contiguous_format, torch.channels_last):
        leff.to(memory_format=layout)
        spy = _Copies()
        with torch.no_grad(), spy:
            maps.append(leff(x, code))
        copies = [s for s in spy.shapes if s == (1, 16, 6, 6)]
        assert copies if layout == torch.contiguous_format else not copies, (layout, spy.shapes)
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-6)
