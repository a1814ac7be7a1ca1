"""IDT (Xiao et al., "Image De-raining Transformer", TPAMI 2022) with CoI-M, as used by CoIC.

A five-level U-Net over token sequences. Every encoder/decoder stage stacks
window-attention blocks (local: tokens are pixels of an 8x8 window) and ends with one
"spatial" block (non-local: tokens are whole 8x8 windows, attended per channel). Both
attention kinds add a relative-position bias and a convolutional positional term.

CoIC changes (active only when a code ``z`` is given):
- the input/output projections, the resampling convs and the depthwise conv of every
  feed-forward network are CoI-M modulated convs;
- every block mixes ``ContextEmbedding(z)`` into its key/value input:
  ``kv = 0.5 * (features + e(z))``.

The network runs only at exactly ``img_size`` x ``img_size`` (the spatial blocks'
position tables are built for that grid): callers tile larger images at ``tile_size``.
Images are (B,3,H,W) in [0,1]; z is (B,dim_in) or None.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor

from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, weight_is_channels_last
from models.coim import ContextEmbedding

__all__ = ["IDT"]

# Side of the windows whose pixels form one token of a spatial block (fixed upstream).
_PATCH = 8
# Reach of the relative-position tables of the spatial blocks per encoder level (the
# decoder mirrors them). Fixed upstream; it equals the window-grid side at img_size 128
# and sets the table shapes, so it must not follow img_size.
_GRID_REACH = (16, 8, 4, 2)
# Reach of the tables of the window blocks (covers 8x8 windows).
_WINDOW_REACH = 8


def _side(n_tokens: int) -> int:
    side = int(round(n_tokens ** 0.5))
    if side * side != n_tokens:
        raise ValueError(f"IDT works on square token grids, got {n_tokens} tokens")
    return side


def _to_map(tokens: Tensor) -> Tensor:
    """(B,L,C) raster-ordered tokens -> (B,C,s,s) with s = sqrt(L)."""
    b, n, c = tokens.shape
    side = _side(n)
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def _to_tokens(fmap: Tensor) -> Tensor:
    """(B,C,H,W) -> (B,H*W,C)."""
    return fmap.flatten(2).transpose(1, 2)


def _relative_index(grid: int, reach: int) -> Tensor:
    """(grid², grid²) indices into a ((2*reach-1)², heads) bias table.

    Offsets between two positions of a grid x grid layout are clipped to ±(reach-1).
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()])                     # (2, grid²)
    delta = (pos[:, :, None] - pos[:, None, :]).clamp(1 - reach, reach - 1) + (reach - 1)
    return delta[0] * (2 * reach - 1) + delta[1]


class PositionalWindowAttention(nn.Module):
    """Multi-head attention over a square grid of ``grid x grid`` tokens.

    Adds a learnt relative-position bias to the logits and, to the attention output, a
    positional term: a depthwise conv (then a head-grouped 1x1) over a separate linear
    projection of the queries' input laid out as a map.
    forward(x, kv): both (B',grid²,dim) -> (B',grid²,dim).
    """

    def __init__(self, dim: int, grid: int, num_heads: int, reach: int = _WINDOW_REACH, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.grid = grid
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.to_pos = nn.Linear(dim, dim, bias=qkv_bias)
        # Kernel 5 where the grid allows it, 3 on a 2x2 grid, 1 on a single token.
        k = 2 * min(grid - 1, 2) + 1
        self.pos_conv = nn.Sequential(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim),
            nn.Conv2d(dim, dim, 1, groups=num_heads),
        )
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * reach - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the shapes; not part of (published) checkpoints.
        self.register_buffer("relative_position_index", _relative_index(grid, reach), persistent=False)

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        b, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        q = self.to_q(x).view(b, n, heads, hd).transpose(1, 2) * self.scale
        k, v = self.to_kv(kv).view(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        # A contiguous (heads, n, n) bias: broadcasting from the permuted view is several times slower.
        logits = q @ k.transpose(-2, -1) + bias.view(n, n, heads).permute(2, 0, 1).contiguous()
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        pos_map = self.to_pos(x).transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return self.proj(out + _to_tokens(self.pos_conv(pos_map)))


class LocallyEnhancedFeedForward(nn.Module):
    """LeFF: Linear+GELU, a residual modulated depthwise 3x3 (+GELU) on the map, Linear.

    forward(x, z): (B,L,dim) raster tokens -> (B,L,dim).
    """

    def __init__(self, dim: int, hidden: int, dim_in: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = ModulatedConv2d(hidden, hidden, 3, padding=1, groups=hidden, dim_in=dim_in)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        # The tokens are a channels-last map. A default-layout model makes it contiguous once, or the
        # conv, the residual sum and the way back to tokens would each convert it; a channels-last model
        # keeps it as it is. fc2 reads the map's strides as they are.
        fmap = _to_map(F.gelu(self.fc1(x)))
        if not weight_is_channels_last(self.dwconv):
            fmap = fmap.contiguous()
        fmap = fmap + F.gelu(self.dwconv(fmap, z))
        return self.fc2(_to_tokens(fmap))


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class WindowBlock(nn.Module):
    """Local block: attention inside non-overlapping windows, then LeFF.

    The key/value input is ``norm_kv(norm1(x))``, or ``norm_kv(0.5*(norm1(x) + e(z)))``
    with a code. forward(x, z): (B,L,dim) -> (B,L,dim), L = resolution².
    """

    def __init__(self, dim: int, resolution: int, num_heads: int, win_size: int, mlp_ratio: float,
                 drop_path: float, dim_in: int = 128):
        super().__init__()
        self.win = min(win_size, resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.norm1_kv = nn.LayerNorm(dim)
        self.context_emb = ContextEmbedding(dim_in, dim)
        self.attn = PositionalWindowAttention(dim, self.win, num_heads)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = LocallyEnhancedFeedForward(dim, int(dim * mlp_ratio), dim_in)

    def _split(self, tokens: Tensor, side: int) -> Tensor:
        """(B,L,C) -> (B*nW, win², C), windows in raster order."""
        b, _, c = tokens.shape
        g, w = side // self.win, self.win
        t = tokens.view(b, g, w, g, w, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(b * g * g, w * w, c)

    def _merge(self, windows: Tensor, batch: int, side: int) -> Tensor:
        """Inverse of :meth:`_split`."""
        c = windows.shape[-1]
        g, w = side // self.win, self.win
        t = windows.view(batch, g, g, w, w, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(batch, side * side, c)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        b, n, _ = x.shape
        side = _side(n)
        q_in = self.norm1(x)
        kv_in = q_in if z is None else 0.5 * (q_in + self.context_emb(z)[:, None, :])
        attended = self.attn(self._split(q_in, side), self._split(self.norm1_kv(kv_in), side))
        x = x + self.drop_path(self._merge(attended, b, side))
        return x + self.drop_path(self.mlp(self.norm2(x), z))


class SpatialBlock(nn.Module):
    """Non-local block: attention among the 8x8 windows of each channel, then LeFF.

    Each channel of each window is one token of 64 pixel values; tokens of the same
    channel attend to each other over the window grid. No pre-norm before attention.
    forward(x, z): (B,L,C) -> (B,L,C), L = resolution².
    """

    def __init__(self, channels: int, resolution: int, num_heads: int, reach: int, mlp_ratio: float,
                 drop_path: float, dim_in: int = 128):
        super().__init__()
        token_dim = _PATCH * _PATCH
        self.grid = resolution // _PATCH
        self.context_emb = ContextEmbedding(dim_in, channels)
        self.attn = PositionalWindowAttention(token_dim, self.grid, num_heads, reach=reach)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(channels)
        # The hidden width follows the 64-d window tokens, not the channel count (as upstream).
        self.mlp = LocallyEnhancedFeedForward(channels, int(token_dim * mlp_ratio), dim_in)

    def _patch_tokens(self, fmap: Tensor) -> Tensor:
        """(B,C,H,W) -> (B*C, grid², 64): one token per (channel, window)."""
        b, c = fmap.shape[:2]
        g, p = self.grid, _PATCH
        t = fmap.reshape(b, c, g, p, g, p).permute(0, 1, 2, 4, 3, 5)
        return t.reshape(b * c, g * g, p * p)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        b, n, c = x.shape
        fmap = _to_map(x)
        kv = fmap if z is None else 0.5 * (fmap + self.context_emb(z)[:, :, None, None])
        attended = self.attn(self._patch_tokens(fmap), self._patch_tokens(kv))
        # Upstream flattens the result back window-major (token = window*64 + pixel),
        # not in raster order; trained weights expect that layout, so keep it.
        x = x + self.drop_path(attended.reshape(b, c, n).transpose(1, 2))
        return x + self.drop_path(self.mlp(self.norm2(x), z))


class IDTStage(nn.Module):
    """``depth`` window blocks, optionally followed by one spatial block."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, win_size: int, mlp_ratio: float,
                 drop_path: Sequence[float], reach: Optional[int], dim_in: int = 128):
        super().__init__()
        # Upstream gives every window block the stage's first drop-path rate and the
        # spatial block its last one.
        blocks: list[nn.Module] = [
            WindowBlock(dim, resolution, num_heads, win_size, mlp_ratio, drop_path[0], dim_in)
            for _ in range(depth)]
        if reach is not None:
            blocks.append(SpatialBlock(dim, resolution, num_heads, reach, mlp_ratio, drop_path[-1], dim_in))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        for block in self.blocks:
            x = block(x, z)
        return x


class _TokenResample(nn.Module):
    """Wraps a (modulated) conv so that it maps (B,L,C) tokens to (B,L',C') tokens."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return _to_tokens(self.conv(_to_map(x), z))


# Published names (after utils.checkpoint's generic CoI-M renaming) -> ours. Every
# pattern matches only published spellings, so our own checkpoints pass unchanged.
_PUBLISHED_RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^encoderlayer_(\d)\."), r"encoders.\1."),
    (re.compile(r"^decoderlayer_(\d)\."), r"decoders.\1."),
    (re.compile(r"^bottle\."), "bottleneck."),
    (re.compile(r"^dowsample_(\d)\.conv\.0\."), r"downs.\1.conv."),
    (re.compile(r"^upsample_(\d)\.deconv\.0\."), r"ups.\1.conv."),
    (re.compile(r"^(input|output)_proj\.proj\.0\."), r"\1_proj."),
    (re.compile(r"\.context_emb\.1\."), ".context_emb.proj."),
    (re.compile(r"\.attn\.Position_Extract\."), ".attn.pos_conv."),
    (re.compile(r"\.attn\.qkv\.proj\."), ".attn.to_pos."),
    (re.compile(r"\.attn\.qkv\.(to_q|to_kv)\."), r".attn.\1."),
    (re.compile(r"\.mlp\.linear1\.0\."), ".mlp.fc1."),
    (re.compile(r"\.mlp\.dwconv\.0\."), ".mlp.dwconv."),
    (re.compile(r"\.mlp\.linear2\.0\."), ".mlp.fc2."),
)


def _check_img_size(img_size: int, win_size: int) -> None:
    for level in range(5):
        res = img_size // 2 ** level
        win = min(win_size, res)
        spatial_ok = level == 4 or res % _PATCH == 0
        if img_size % 2 ** level or res % win or not spatial_ok:
            raise ValueError(f"IDT img_size {img_size} is unsupported: level {level} has resolution "
                             f"{img_size / 2 ** level:g}, which must split into {_PATCH}x{_PATCH} patches and "
                             f"{win}x{win} windows (use 64 or a multiple of 128)")


class IDT(nn.Module):
    """IDT backbone with CoI-M.

    forward(x, z=None): x (B,3,img_size,img_size) in [0,1]; z (B,dim_in) unit codes or
    None (plain network). Returns x + residual (B,3,img_size,img_size), not clamped.
    Any other spatial size raises ValueError: tile inputs at ``tile_size``.
    """

    size_multiple: int = 128  # instances use their img_size
    tile_size: Optional[int] = 128

    def __init__(self, img_size: int = 128, in_chans: int = 3, embed_dim: int = 32,
                 depths: Sequence[int] = (3, 3, 2, 2, 1, 1, 2, 2, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8, 16, 16, 8, 4, 2), win_size: int = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 dim_in: int = 128):
        super().__init__()
        if len(depths) != 9 or len(num_heads) != 9 or min(depths) < 1:
            raise ValueError("IDT needs 9 depths (each >= 1) and 9 head counts")
        _check_img_size(img_size, win_size)
        self.img_size = img_size
        self.size_multiple = img_size
        self.tile_size = img_size
        self.dim_in = dim_in

        # Stochastic depth: linear over the encoder blocks, mirrored in the decoder,
        # the maximum in the bottleneck.
        enc_rates = torch.linspace(0, drop_path_rate, sum(depths[:4])).tolist()
        dec_rates = enc_rates[::-1]
        enc_starts = [sum(depths[:i]) for i in range(5)]
        dec_starts = [sum(depths[5:5 + i]) for i in range(5)]

        e = embed_dim
        self.input_proj = ModulatedConv2d(in_chans, e, 3, padding=1, dim_in=dim_in)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for lvl in range(4):
            width = e * 2 ** lvl
            self.encoders.append(IDTStage(width, img_size // 2 ** lvl, depths[lvl], num_heads[lvl], win_size,
                                          mlp_ratio, enc_rates[enc_starts[lvl]:enc_starts[lvl + 1]],
                                          _GRID_REACH[lvl], dim_in))
            self.downs.append(_TokenResample(
                ModulatedConv2d(width, 2 * width, 4, stride=2, padding=1, dim_in=dim_in)))
        self.bottleneck = IDTStage(16 * e, img_size // 16, depths[4], num_heads[4], win_size, mlp_ratio,
                                   [drop_path_rate], None, dim_in)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(4):
            lvl = 3 - i
            in_width = 16 * e if i == 0 else 2 * e * 2 ** (lvl + 1)   # bottleneck or previous decoder
            self.ups.append(_TokenResample(
                ModulatedConvTranspose2d(in_width, e * 2 ** lvl, 2, stride=2, padding=0, dim_in=dim_in)))
            # Decoders work on [upsampled | skip], i.e. twice the encoder width.
            self.decoders.append(IDTStage(2 * e * 2 ** lvl, img_size // 2 ** lvl, depths[5 + i], num_heads[5 + i],
                                          win_size, mlp_ratio, dec_rates[dec_starts[i]:dec_starts[i + 1]],
                                          _GRID_REACH[lvl], dim_in))
        self.output_proj = ModulatedConv2d(2 * e, in_chans, 3, padding=1, dim_in=dim_in)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Applies to every Linear, the CoI-M generators and context embeddings included.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"IDT runs only at {self.img_size}x{self.img_size} (its img_size), got "
                             f"{tuple(x.shape[-2:])}; tile the input at tile_size={self.tile_size}")
        h = _to_tokens(F.leaky_relu(self.input_proj(x, z), 0.01))
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            h = encoder(h, z)
            skips.append(h)
            h = down(h, z)
        h = self.bottleneck(h, z)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            h = decoder(torch.cat([up(h, z), skip], dim=-1), z)
        return x + self.output_proj(_to_map(h), z)

    def remap_legacy_keys(self, state: dict) -> dict:
        """Rename published CoIC IDT keys (already CoI-M-renamed) to ours."""
        out = {}
        for key, value in state.items():
            for pattern, repl in _PUBLISHED_RENAMES:
                key = pattern.sub(repl, key)
            out[key] = value
        return out
