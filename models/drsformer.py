"""DRSformer (Chen et al., CVPR 2023) with CoI-M, as used by CoIC.

A four-level Restormer-style U-Net whose blocks use top-k sparse channel attention
(TKSA) and a mixed-scale feed-forward network (MSFN), with mixture-of-experts feature
compensators (MEFC) after the patch embedding and before the output conv.

CoIC changes (active only when a code ``z`` is given):
- every 3x3/5x5/7x7 conv of the image path and of the FFN/MEFC depthwise convs is a
  :class:`~models.coim.ModulatedConv2d`;
- each transformer block adds ``ContextEmbedding(z)`` (a per-channel offset) to the
  input of its key/value branch.

Shapes: images (B,3,H,W) in [0,1] with H, W multiples of 8; z (B,dim_in) or None.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.coim import ContextEmbedding, ModulatedConv2d

__all__ = ["DRSformer"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B,C,H,W) map (eps 1e-5, biased variance).

    ``with_bias=False`` is the Restormer "BiasFree" variant, which rescales by the
    standard deviation without removing the mean.
    """

    def __init__(self, dim: int, with_bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None

    def forward(self, x: Tensor) -> Tensor:
        t = x.permute(0, 2, 3, 1)  # a view; contiguous when x is channels-last
        if self.bias is not None:
            t = F.layer_norm(t, t.shape[-1:], self.weight, self.bias, eps=1e-5)
        else:
            t = t * torch.rsqrt(t.var(dim=-1, keepdim=True, unbiased=False) + 1e-5) * self.weight
        out = t.permute(0, 3, 1, 2)
        # Give the map back in x's own layout: a channels-last result inside a contiguous network
        # would make every following convolution and addition convert it.
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


# Fractions of the key channels each of the four sparse attention maps keeps.
_TOPK_FRACTIONS = ((1, 2), (2, 3), (3, 4), (4, 5))


class TopKSparseAttention(nn.Module):
    """Channel ("transposed") attention in which each query keeps only its top-k keys.

    Four attention maps with k = C/2, 2C/3, 3C/4, 4C/5 (C = channels per head) are
    computed from the same logits and their outputs are blended by learnable scalars.
    forward(x, kv): both (B,dim,H,W) -> (B,dim,H,W); queries come from ``x``,
    keys/values from ``kv``.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.to_q = nn.Conv2d(dim, dim, 1, bias=bias)
        self.to_kv = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
        # One depthwise 3x3 over the stacked q|k|v channels adds local context.
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)
        self.mix = nn.Parameter(torch.full((len(_TOPK_FRACTIONS),), 0.2))

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        b, c, h, w = x.shape
        stacked = self.qkv_dwconv(torch.cat([self.to_q(x), self.to_kv(kv)], dim=1))
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in stacked.chunk(3, dim=1))
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature
        n_keys = logits.shape[-1]
        floor = torch.full_like(logits, float("-inf"))
        out = torch.zeros_like(v)
        for weight, (num, den) in zip(self.mix, _TOPK_FRACTIONS):
            keep = logits.topk(int(n_keys * num / den), dim=-1).indices
            sparse = floor.scatter(-1, keep, logits.gather(-1, keep))
            out = out + weight * (sparse.softmax(dim=-1) @ v)
        return self.project_out(out.reshape(b, c, h, w))


class MixedScaleFeedForward(nn.Module):
    """MSFN: parallel depthwise 3x3 and 5x5 paths whose halves are cross-mixed.

    forward(x, z): (B,dim,H,W) -> (B,dim,H,W). All four depthwise convs are modulated.
    """

    def __init__(self, dim: int, expansion: float, bias: bool, dim_in: int = 128):
        super().__init__()
        hidden = int(dim * expansion)
        wide = 2 * hidden
        self.project_in = nn.Conv2d(dim, wide, 1, bias=bias)
        self.dwconv3x3 = ModulatedConv2d(wide, wide, 3, padding=1, groups=wide, bias=bias, dim_in=dim_in)
        self.dwconv5x5 = ModulatedConv2d(wide, wide, 5, padding=2, groups=wide, bias=bias, dim_in=dim_in)
        # Second stage: grouped convs with 2 inputs per group, each fed one half of
        # both first-stage outputs.
        self.dwconv3x3_1 = ModulatedConv2d(wide, hidden, 3, padding=1, groups=hidden, bias=bias, dim_in=dim_in)
        self.dwconv5x5_1 = ModulatedConv2d(wide, hidden, 5, padding=2, groups=hidden, bias=bias, dim_in=dim_in)
        self.project_out = nn.Conv2d(wide, dim, 1, bias=bias)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        x = self.project_in(x)
        a3, b3 = F.relu(self.dwconv3x3(x, z)).chunk(2, dim=1)
        a5, b5 = F.relu(self.dwconv5x5(x, z)).chunk(2, dim=1)
        left = F.relu(self.dwconv3x3_1(torch.cat([a3, a5], dim=1), z))
        right = F.relu(self.dwconv5x5_1(torch.cat([b3, b5], dim=1), z))
        return self.project_out(torch.cat([left, right], dim=1))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + TKSA(norm(x), norm(x + e(z))); then x + MSFN(norm(x)).

    forward(x, z): (B,dim,H,W) -> (B,dim,H,W). Without ``z`` the key/value input is x.
    """

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 layer_norm_type: str, dim_in: int = 128):
        super().__init__()
        with_bias = layer_norm_type != "BiasFree"
        self.context_emb = ContextEmbedding(dim_in, dim)
        self.norm1_q = ChannelLayerNorm(dim, with_bias)
        self.norm1_kv = ChannelLayerNorm(dim, with_bias)
        self.attn = TopKSparseAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, with_bias)
        self.ffn = MixedScaleFeedForward(dim, ffn_expansion_factor, bias, dim_in)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        kv = x if z is None else x + self.context_emb(z)[:, :, None, None]
        x = x + self.attn(self.norm1_q(x), self.norm1_kv(kv))
        return x + self.ffn(self.norm2(x), z)


# ----------------------------------------------------------------------------------
# MEFC: a router picks soft weights over eight small "expert" operators per step.

class SeparableExpert(nn.Module):
    """Two rounds of (modulated depthwise kxk -> 1x1), with a ReLU between them."""

    def __init__(self, dim: int, kernel: int, dim_in: int = 128):
        super().__init__()
        pad = kernel // 2
        self.dw1 = ModulatedConv2d(dim, dim, kernel, padding=pad, groups=dim, bias=False, dim_in=dim_in)
        self.pw1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.dw2 = ModulatedConv2d(dim, dim, kernel, padding=pad, groups=dim, bias=False, dim_in=dim_in)
        self.pw2 = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        x = F.relu(self.pw1(self.dw1(x, z)))
        return self.pw2(self.dw2(x, z))


class DilatedExpert(nn.Module):
    """Modulated depthwise kxk with dilation 2, then a 1x1."""

    def __init__(self, dim: int, kernel: int, dim_in: int = 128):
        super().__init__()
        self.dw = ModulatedConv2d(dim, dim, kernel, padding=kernel - 1, dilation=2, groups=dim, bias=False,
                                  dim_in=dim_in)
        self.pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return self.pw(self.dw(x, z))


class PoolExpert(nn.Module):
    """3x3 average pooling that ignores padded pixels (no parameters)."""

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


# Expert order is fixed by the published checkpoints (and by the router's output layout).
_EXPERT_SPECS = (("sep", 1), ("sep", 3), ("sep", 5), ("sep", 7), ("dil", 3), ("dil", 5), ("dil", 7), ("pool", 3))


def _make_expert(kind: str, kernel: int, dim: int, dim_in: int) -> nn.Module:
    if kind == "sep":
        return SeparableExpert(dim, kernel, dim_in)
    if kind == "dil":
        return DilatedExpert(dim, kernel, dim_in)
    return PoolExpert()


class ExpertMixture(nn.Module):
    """One MEFC step: gate-weighted expert outputs, concatenated and fused by a 1x1 + ReLU.

    forward(x, gates, z): x (B,C,H,W), gates (B,n_experts) -> (B,C,H,W).
    """

    def __init__(self, dim: int, dim_in: int = 128):
        super().__init__()
        self.experts = nn.ModuleList(_make_expert(kind, k, dim, dim_in) for kind, k in _EXPERT_SPECS)
        self.fuse = nn.Conv2d(dim * len(_EXPERT_SPECS), dim, 1, bias=False)

    def forward(self, x: Tensor, gates: Tensor, z: Optional[Tensor] = None) -> Tensor:
        parts = [expert(x, z) * gates[:, j, None, None, None] for j, expert in enumerate(self.experts)]
        return F.relu(self.fuse(torch.cat(parts, dim=1)))


class FeatureCompensator(nn.Module):
    """MEFC: residual chain of ``steps`` expert mixtures routed from the input's channel means.

    forward(x, z): (B,dim,H,W) -> (B,dim,H,W).
    """

    def __init__(self, dim: int, steps: int = 4, dim_in: int = 128):
        super().__init__()
        n = len(_EXPERT_SPECS)
        self.steps = steps
        self.router = nn.Sequential(nn.Linear(dim, 2 * steps * n), nn.ReLU(), nn.Linear(2 * steps * n, steps * n))
        self.entry = nn.Conv2d(dim, dim, 1, bias=False)
        self.stages = nn.ModuleList(ExpertMixture(dim, dim_in) for _ in range(steps))

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        # The routing weights are computed once, from the compensator's input.
        gates = self.router(x.mean(dim=(2, 3))).view(x.shape[0], self.steps, -1).softmax(dim=-1)
        h = F.relu(self.entry(x))
        for i, stage in enumerate(self.stages):
            h = F.relu(h + stage(h, gates[:, i], z))
        return h


class PixelShuffleResample(nn.Module):
    """Modulated 3x3 conv followed by pixel (un)shuffle by 2.

    Down: (B,C,H,W) -> (B,2C,H/2,W/2); up: (B,C,H,W) -> (B,C/2,2H,2W).
    """

    def __init__(self, channels: int, down: bool, dim_in: int = 128):
        super().__init__()
        self.down = down
        out = channels // 2 if down else channels * 2
        self.conv = ModulatedConv2d(channels, out, 3, padding=1, bias=False, dim_in=dim_in)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        x = self.conv(x, z)
        return F.pixel_unshuffle(x, 2) if self.down else F.pixel_shuffle(x, 2)


def _run_stage(blocks: Iterable[nn.Module], x: Tensor, z: Optional[Tensor]) -> Tensor:
    for block in blocks:
        x = block(x, z)
    return x


def _mefc_rename(match: re.Match) -> str:
    """``...layers.1._ops.S._ops.E.op.N.`` -> ``...stages.S.experts.E.<name>.``."""
    step, expert, index = match.group(1), int(match.group(2)), match.group(3)
    kind = _EXPERT_SPECS[expert][0]
    names = {"sep": {"0": "dw1", "1": "pw1", "3": "dw2", "4": "pw2"}, "dil": {"0": "dw", "1": "pw"}}[kind]
    return f".stages.{step}.experts.{expert}.{names[index]}."


# Published names (after utils.checkpoint's generic CoI-M renaming) -> ours. Every
# pattern matches only published spellings, so our own checkpoints pass unchanged.
_PUBLISHED_RENAMES: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"^((?:down|up)\d_\d)\.body\.0\."), r"\1.conv."),
    (re.compile(r"\.(norm1_q|norm1_kv|norm2)\.body\."), r".\1."),
    (re.compile(r"\.context_emb\.1\."), ".context_emb.proj."),
    (re.compile(r"\.layers\.0\.ca_fc\."), ".router."),
    (re.compile(r"\.layers\.1\.preprocess\.op\.0\."), ".entry."),
    (re.compile(r"\.layers\.1\._ops\.(\d+)\._ops\.(\d+)\.op\.(\d+)\."), _mefc_rename),
    (re.compile(r"\.layers\.1\._ops\.(\d+)\._out\.0\."), r".stages.\1.fuse."),
)
_PUBLISHED_MIX = re.compile(r"^(.*\.attn)\.attn([1-4])$")


class DRSformer(nn.Module):
    """DRSformer backbone with CoI-M.

    forward(x, z=None): x (B,3,H,W) in [0,1], H and W multiples of 8; z (B,dim_in) unit
    codes or None (plain network). Returns the restored image (B,3,H,W), not clamped.
    """

    size_multiple: int = 8  # three 2x downsamplings
    tile_size: Optional[int] = None

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66, bias: bool = False, LayerNorm_type: str = "WithBias",
                 dim_in: int = 128, mefc_steps: int = 4):
        super().__init__()
        if LayerNorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', got {LayerNorm_type!r}")
        self.dim_in = dim_in

        def stage(width: int, depth: int, n_heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                SparseTransformerBlock(width, n_heads, ffn_expansion_factor, bias, LayerNorm_type, dim_in)
                for _ in range(depth))

        d1, d2, d3, d4 = dim, 2 * dim, 4 * dim, 8 * dim
        # The published patch embedding ignores ``bias`` and never has one.
        self.patch_embed = ModulatedConv2d(inp_channels, d1, 3, padding=1, bias=False, dim_in=dim_in)
        self.encoder_level0 = FeatureCompensator(d1, mefc_steps, dim_in)
        self.encoder_level1 = stage(d1, num_blocks[0], heads[0])
        self.down1_2 = PixelShuffleResample(d1, down=True, dim_in=dim_in)
        self.encoder_level2 = stage(d2, num_blocks[1], heads[1])
        self.down2_3 = PixelShuffleResample(d2, down=True, dim_in=dim_in)
        self.encoder_level3 = stage(d3, num_blocks[2], heads[2])
        self.down3_4 = PixelShuffleResample(d3, down=True, dim_in=dim_in)
        self.latent = stage(d4, num_blocks[3], heads[3])

        self.up4_3 = PixelShuffleResample(d4, down=False, dim_in=dim_in)
        self.reduce_chan_level3 = nn.Conv2d(d4, d3, 1, bias=bias)
        self.decoder_level3 = stage(d3, num_blocks[2], heads[2])
        self.up3_2 = PixelShuffleResample(d3, down=False, dim_in=dim_in)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, 1, bias=bias)
        self.decoder_level2 = stage(d2, num_blocks[1], heads[1])
        # Level 1 keeps the concatenated 2*dim channels (no reduction conv).
        self.up2_1 = PixelShuffleResample(d2, down=False, dim_in=dim_in)
        self.decoder_level1 = stage(d2, num_blocks[0], heads[0])
        self.refinement = FeatureCompensator(d2, mefc_steps, dim_in)
        self.output = ModulatedConv2d(d2, out_channels, 3, padding=1, bias=bias, dim_in=dim_in)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(f"DRSformer needs H and W divisible by {self.size_multiple}, got {tuple(x.shape[-2:])}")
        feat = self.encoder_level0(self.patch_embed(x, z), z)
        enc1 = _run_stage(self.encoder_level1, feat, z)
        enc2 = _run_stage(self.encoder_level2, self.down1_2(enc1, z), z)
        enc3 = _run_stage(self.encoder_level3, self.down2_3(enc2, z), z)
        h = _run_stage(self.latent, self.down3_4(enc3, z), z)

        h = self.reduce_chan_level3(torch.cat([self.up4_3(h, z), enc3], dim=1))
        h = _run_stage(self.decoder_level3, h, z)
        h = self.reduce_chan_level2(torch.cat([self.up3_2(h, z), enc2], dim=1))
        h = _run_stage(self.decoder_level2, h, z)
        h = _run_stage(self.decoder_level1, torch.cat([self.up2_1(h, z), enc1], dim=1), z)
        h = self.refinement(h, z)
        return self.output(h, z) + x

    def remap_legacy_keys(self, state: dict) -> dict:
        """Rename published CoIC DRSformer keys (already CoI-M-renamed) to ours.

        Besides renames, the four scalar blend weights ``attn.attn1..attn4`` are stacked
        into one vector ``attn.mix``.
        """
        out: dict = {}
        blend: dict[str, dict[int, Tensor]] = {}
        for key, value in state.items():
            m = _PUBLISHED_MIX.match(key)
            if m:
                blend.setdefault(m.group(1), {})[int(m.group(2))] = value
                continue
            for pattern, repl in _PUBLISHED_RENAMES:
                key = pattern.sub(repl, key)
            out[key] = value
        for prefix, parts in blend.items():
            if sorted(parts) != [1, 2, 3, 4]:
                # Incomplete: leave as-is so the strict load reports the odd keys.
                out.update({f"{prefix}.attn{i}": t for i, t in parts.items()})
                continue
            out[f"{prefix}.mix"] = torch.cat([parts[i].reshape(1) for i in (1, 2, 3, 4)])
        return out
