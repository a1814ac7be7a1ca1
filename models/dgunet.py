"""DGUNet+ (Mou et al., CVPR 2022) with CoI-M modulated convolutions, as used by CoIC.

DGUNet unfolds proximal gradient descent for ``y = A x + n`` with a learned degradation:
every stage first takes a gradient step with learned operators (``phi`` ~ A, ``phit`` ~ A^T,
step ``r``),

    x_grad = x - r * phit(phi(x) - y)

and then applies a proximal mapping: a U-Net (4 levels) whose encoder receives the previous
stage's encoder and decoder features (cross-stage feature fusion, CSFF) and whose input is
merged with the previous stage's features by a learned-subspace projection. The stages are

    stage 1        own GDM + U-Net                         (stage1_*, sam12, phi_0/phit_0, r0)
    stages 2..D+1  ONE weight-shared block applied D times  (``basic``, D = ``depth``)
    last stage     GDM + a single conv head                 (shallow_feat7, concat67, tail, ...)

All convolutions that the reference turns into CoI-M layers are ``ModulatedConv2d`` /
``ModulatedConvTranspose2d``; the channel-attention 1x1 convs stay plain ``nn.Conv2d``.
Sub-module names follow the reference so that published checkpoints load after the generic
``base_conv.conv``/``g2pa_wgen`` renaming in ``utils.checkpoint``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.coim import ModulatedConv2d, ModulatedConvTranspose2d, is_channels_last

__all__ = ["DGUNet"]

# The U-Net inside every stage always has 4 levels (3 stride-2 down-samplings).
_UNET_LEVELS = 4


def _conv(cin: int, cout: int, kernel_size: int, dim_in: int, bias: bool = False) -> ModulatedConv2d:
    """'Same'-padded modulated convolution."""
    return ModulatedConv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias, dim_in=dim_in)


# --------------------------------------------------------------------------------------
# Gradient-descent module pieces
# --------------------------------------------------------------------------------------

class _ImageOperator(nn.Module):
    """Learned image-space operator (phi or phi^T): ``x + conv(PReLU(conv(x)))``, (B,3,H,W)."""

    hidden = 64

    def __init__(self, channels: int, kernel_size: int, dim_in: int):
        super().__init__()
        # The reference always uses biased convolutions and a fresh PReLU here.
        self.body = nn.ModuleList([
            _conv(channels, self.hidden, kernel_size, dim_in, bias=True),
            nn.PReLU(),
            _conv(self.hidden, channels, kernel_size, dim_in, bias=True),
        ])

    def forward(self, x: Tensor, z: Optional[Tensor]) -> Tensor:
        squeeze, act, expand = self.body
        return x + expand(act(squeeze(x, z)), z)


def _gradient_step(phi: _ImageOperator, phit: _ImageOperator, step: Tensor, estimate: Tensor,
                   observed: Tensor, z: Optional[Tensor]) -> Tensor:
    """One learned gradient step ``x - r * phi^T(phi(x) - y)`` on (B,3,H,W) images."""
    return estimate - step * phit(phi(estimate, z) - observed, z)


# --------------------------------------------------------------------------------------
# Feature blocks
# --------------------------------------------------------------------------------------

class _ChannelGate(nn.Module):
    """Squeeze-and-excitation gating with plain 1x1 convs (never modulated in the reference)."""

    def __init__(self, channels: int, reduction: int, bias: bool):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class _ChannelAttentionBlock(nn.Module):
    """conv-act-conv, channel gating, residual; (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool,
                 act: nn.Module, dim_in: int):
        super().__init__()
        self.body = nn.ModuleList([
            _conv(channels, channels, kernel_size, dim_in, bias=bias),
            act,
            _conv(channels, channels, kernel_size, dim_in, bias=bias),
        ])
        self.CA = _ChannelGate(channels, reduction, bias)

    def forward(self, x: Tensor, z: Optional[Tensor]) -> Tensor:
        first, act, second = self.body
        return x + self.CA(second(act(first(x, z)), z))


class _ShallowFeatures(nn.Sequential):
    """Image (B,3,H,W) -> features (B,n_feat,H,W): one conv then a channel-attention block."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, bias: bool,
                 act: nn.Module, dim_in: int):
        super().__init__(
            _conv(3, n_feat, kernel_size, dim_in, bias=bias),
            _ChannelAttentionBlock(n_feat, kernel_size, reduction, bias, act, dim_in),
        )

    def forward(self, x: Tensor, z: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        return self[1](self[0](x, z), z)


class _SupervisedAttention(nn.Module):
    """Stage output head (SAM, here without its attention branch as in the reference).

    features (B,C,H,W), stage input image (B,3,H,W) -> (features + conv1(features),
    image + conv2(features)). Both convs are 1x1, hence never modulated.
    """

    def __init__(self, n_feat: int, bias: bool, dim_in: int):
        super().__init__()
        self.conv1 = _conv(n_feat, n_feat, 1, dim_in, bias=bias)
        self.conv2 = _conv(n_feat, 3, 1, dim_in, bias=bias)

    def forward(self, feats: Tensor, image: Tensor, z: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return feats + self.conv1(feats, z), image + self.conv2(feats, z)


class _SubspaceMerge(nn.Module):
    """Merge current features with the previous stage's by projecting the latter onto a
    learned, per-image subspace of ``subspace_dim`` spatial basis vectors.

    x, previous: (B,C,H,W) -> (B,C,H,W). Needs H*W >= subspace_dim.
    """

    def __init__(self, n_feat: int, kernel_size: int, bias: bool, dim_in: int, subspace_dim: int = 16):
        super().__init__()
        self.num_subspace = subspace_dim
        self.subnet = _conv(2 * n_feat, subspace_dim, kernel_size, dim_in, bias=bias)
        self.conv_block = _conv(2 * n_feat, n_feat, kernel_size, dim_in, bias=bias)

    def forward(self, x: Tensor, previous: Tensor, z: Optional[Tensor]) -> Tensor:
        basis = self.subnet(torch.cat([x, previous], dim=1), z).flatten(2)          # (B,K,N)
        basis = basis / (basis.abs().sum(dim=2, keepdim=True) + 1e-6)
        gram = basis @ basis.transpose(1, 2)                                          # (B,K,K)
        flat = previous.flatten(2)                                                    # (B,C,N)
        # Least-squares coefficients of every channel in the basis: (V V^T)^-1 V f. solve_ex does not
        # check for singularity (a host-device sync per call on GPUs); a singular Gram matrix gives a
        # non-finite loss, which the Trainer skips. The solve runs in float32 under autocast (no bf16
        # or fp16 LU kernel exists, on CPUs or GPUs); in float32 the casts are no-ops.
        rhs = basis @ flat.transpose(1, 2)
        with torch.autocast(gram.device.type, enabled=False):
            coeffs = torch.linalg.solve_ex(gram.float(), rhs.float())[0].to(rhs.dtype)  # (B,K,C)
        if is_channels_last(previous):  # the same products, written out channels-last (no copy before the conv)
            b, c, h, w = previous.shape
            projected = (basis.transpose(1, 2) @ coeffs).view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            projected = (coeffs.transpose(1, 2) @ basis).view_as(previous)
        return x + self.conv_block(torch.cat([x, projected], dim=1), z)


class _UNetBlock(nn.Module):
    """Two 3x3 convs with LeakyReLU(0.2) and a 1x1 shortcut; (B,in,H,W) -> (B,out,H,W).

    half_instance_norm: instance-normalise the first half of the channels after conv_1 (HIN).
    cross_stage:        fuse the previous stage's encoder/decoder features (CSFF) into the
                        output through a sigmoid gate ``phi`` and a shift ``gamma``.
    downsample:         own a 4x4 stride-2 conv (applied by the encoder, not by forward).
    """

    def __init__(self, cin: int, cout: int, dim_in: int, downsample: bool = False,
                 cross_stage: bool = False, half_instance_norm: bool = False):
        super().__init__()
        self.identity = ModulatedConv2d(cin, cout, 1, padding=0, dim_in=dim_in)
        self.conv_1 = ModulatedConv2d(cin, cout, 3, padding=1, dim_in=dim_in)
        self.conv_2 = ModulatedConv2d(cout, cout, 3, padding=1, dim_in=dim_in)
        self.use_csff = downsample and cross_stage  # the reference fuses only on down-sampling levels
        if self.use_csff:
            self.csff_enc = ModulatedConv2d(cout, cout, 3, padding=1, dim_in=dim_in)
            self.csff_dec = ModulatedConv2d(cin, cout, 3, padding=1, dim_in=dim_in)
            self.phi = ModulatedConv2d(cout, cout, 3, padding=1, dim_in=dim_in)
            self.gamma = ModulatedConv2d(cout, cout, 3, padding=1, dim_in=dim_in)
        self.norm = nn.InstanceNorm2d(cout // 2, affine=True) if half_instance_norm else None
        self.downsample = (ModulatedConv2d(cout, cout, 4, stride=2, padding=1, bias=False, dim_in=dim_in)
                           if downsample else None)

    def forward(self, x: Tensor, z: Optional[Tensor], enc: Optional[Tensor] = None,
                dec: Optional[Tensor] = None) -> Tensor:
        out = self.conv_1(x, z)
        if self.norm is not None:
            half = self.norm.num_features
            normed = self.norm(out[:, :half])
            if is_channels_last(out):
                # instance_norm answers in the default layout; a concatenation of both layouts
                # falls back to it, and the next convolution would copy the whole map back
                normed = normed.contiguous(memory_format=torch.channels_last)
            out = torch.cat([normed, out[:, half:]], dim=1)
        out = F.leaky_relu(out, 0.2)
        out = F.leaky_relu(self.conv_2(out, z), 0.2) + self.identity(x, z)
        if enc is not None and dec is not None:
            if not self.use_csff:
                raise RuntimeError("cross-stage features passed to a block built without CSFF")
            skip = F.leaky_relu(self.csff_enc(enc, z) + self.csff_dec(dec, z), 0.1)
            out = out + out * torch.sigmoid(self.phi(skip, z)) + self.gamma(skip, z)
        return out


class _Encoder(nn.Module):
    """U-Net encoder: (B,n_feat,H,W) -> (skips [n_feat+s, +2s, +3s channels at H, H/2, H/4],
    bottom (B, n_feat+3s, H/8, W/8)), with s = scale_unetfeats."""

    def __init__(self, n_feat: int, scale: int, cross_stage: bool, dim_in: int):
        super().__init__()
        widths = [n_feat + scale * i for i in range(_UNET_LEVELS)]
        self.body = nn.ModuleList(
            _UNetBlock(widths[i], widths[i + 1], dim_in, downsample=True, cross_stage=cross_stage,
                       half_instance_norm=True)
            for i in range(_UNET_LEVELS - 1))
        self.body.append(_UNetBlock(widths[-1], widths[-1], dim_in, cross_stage=cross_stage,
                                    half_instance_norm=True))

    def forward(self, x: Tensor, z: Optional[Tensor], prev_skips: Optional[Sequence[Tensor]] = None,
                prev_decoded: Optional[Sequence[Tensor]] = None) -> tuple[list[Tensor], Tensor]:
        fuse = prev_skips is not None and prev_decoded is not None
        skips: list[Tensor] = []
        for level, block in enumerate(self.body):
            if block.downsample is None:  # bottom level: no cross-stage fusion in the reference
                x = block(x, z)
                continue
            # Decoder outputs are ordered coarse to fine, encoder levels fine to coarse.
            enc = prev_skips[level] if fuse else None
            dec = prev_decoded[-1 - level] if fuse else None
            feat = block(x, z, enc, dec)
            skips.append(feat)
            x = block.downsample(feat, z)
        return skips, x


class _UpBlock(nn.Module):
    """2x transposed-conv up-sampling, concatenation with a skip, one ``_UNetBlock``."""

    def __init__(self, cin: int, cout: int, dim_in: int):
        super().__init__()
        self.up = ModulatedConvTranspose2d(cin, cout, 2, stride=2, padding=0, bias=True, dim_in=dim_in)
        self.conv_block = _UNetBlock(2 * cout, cout, dim_in)

    def forward(self, x: Tensor, skip: Tensor, z: Optional[Tensor]) -> Tensor:
        return self.conv_block(torch.cat([self.up(x, z), skip], dim=1), z)


class _Decoder(nn.Module):
    """U-Net decoder: bottom + encoder skips -> features at H/4, H/2, H (coarse to fine),
    with n_feat+2s, n_feat+s, n_feat channels."""

    def __init__(self, n_feat: int, scale: int, dim_in: int):
        super().__init__()
        widths = [n_feat + scale * i for i in range(_UNET_LEVELS)][::-1]   # coarse to fine
        self.body = nn.ModuleList(_UpBlock(widths[i], widths[i + 1], dim_in)
                                  for i in range(_UNET_LEVELS - 1))
        # Skips are first mapped to the width of the level they join.
        self.skip_conv = nn.ModuleList(ModulatedConv2d(widths[i], widths[i + 1], 3, padding=1, dim_in=dim_in)
                                       for i in range(_UNET_LEVELS - 1))

    def forward(self, x: Tensor, skips: Sequence[Tensor], z: Optional[Tensor]) -> list[Tensor]:
        outs: list[Tensor] = []
        for up, squeeze, skip in zip(self.body, self.skip_conv, reversed(skips)):
            x = up(x, squeeze(skip, z), z)
            outs.append(x)
        return outs


class _MiddleStage(nn.Module):
    """One DGUNet stage that fuses the previous stage's state; its weights are shared by all
    middle stages. Returns the new (sam features, image, encoder skips, decoder outputs)."""

    def __init__(self, n_feat: int, scale_unetfeats: int, kernel_size: int, reduction: int,
                 bias: bool, dim_in: int):
        super().__init__()
        self.phi_1 = _ImageOperator(3, kernel_size, dim_in)
        self.phit_1 = _ImageOperator(3, kernel_size, dim_in)
        self.r1 = nn.Parameter(torch.tensor([0.5]))
        self.shallow_feat2 = _ShallowFeatures(n_feat, kernel_size, reduction, bias, nn.PReLU(), dim_in)
        self.merge12 = _SubspaceMerge(n_feat, 3, True, dim_in)
        self.stage2_encoder = _Encoder(n_feat, scale_unetfeats, cross_stage=True, dim_in=dim_in)
        self.stage2_decoder = _Decoder(n_feat, scale_unetfeats, dim_in)
        self.sam23 = _SupervisedAttention(n_feat, bias, dim_in)

    def forward(self, observed: Tensor, image: Tensor, skips: list[Tensor], decoded: list[Tensor],
                sam_feats: Tensor, z: Optional[Tensor]) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        image = _gradient_step(self.phi_1, self.phit_1, self.r1, image, observed, z)
        feats = self.merge12(self.shallow_feat2(image, z), sam_feats, z)
        skips, bottom = self.stage2_encoder(feats, z, skips, decoded)
        decoded = self.stage2_decoder(bottom, skips, z)
        sam_feats, image = self.sam23(decoded[-1], image, z)
        return sam_feats, image, skips, decoded


class DGUNet(nn.Module):
    """DGUNet+ with CoI-M; ``depth + 2`` stages in total.

    Args (reference values; the reference hard-codes all but ``depth`` and ``dim_in``):
        depth:            number of applications of the weight-shared middle stage (5).
        dim_in:           size of the CoIC code z (128).
        n_feat:           base feature width (40).
        scale_unetfeats:  width added per U-Net level (20).
        scale_orsnetfeats: extra width of the last stage's head (16).
        kernel_size, reduction, bias: conv size (3), channel-attention reduction (4), conv bias (False).

    forward(x, z=None): x (B,3,H,W) in [0,1] with H, W multiples of ``size_multiple`` (and
    H*W >= 16), z (B,dim_in) or None -> restored (B,3,H,W), not clamped.
    """

    size_multiple: int = 2 ** (_UNET_LEVELS - 1)
    # Every convolution reads a channels-last map when the model and its input are channels-last
    # (tests/test_models_contract.py holds it to that).
    channels_last_throughout = True

    def __init__(self, depth: int = 5, dim_in: int = 128, n_feat: int = 40, scale_unetfeats: int = 20,
                 scale_orsnetfeats: int = 16, kernel_size: int = 3, reduction: int = 4, bias: bool = False):
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.depth = depth
        # The reference hands ONE PReLU to the first and the last stage's shallow features,
        # so they share its slope; kept for identical parameters and training behaviour.
        shared_act = nn.PReLU()

        # First stage.
        self.phi_0 = _ImageOperator(3, kernel_size, dim_in)
        self.phit_0 = _ImageOperator(3, kernel_size, dim_in)
        self.r0 = nn.Parameter(torch.tensor([0.5]))
        self.shallow_feat1 = _ShallowFeatures(n_feat, kernel_size, reduction, bias, shared_act, dim_in)
        self.stage1_encoder = _Encoder(n_feat, scale_unetfeats, cross_stage=False, dim_in=dim_in)
        self.stage1_decoder = _Decoder(n_feat, scale_unetfeats, dim_in)
        self.sam12 = _SupervisedAttention(n_feat, bias, dim_in)

        # Middle stages (one module, reused ``depth`` times).
        self.basic = _MiddleStage(n_feat, scale_unetfeats, kernel_size, reduction, bias, dim_in)

        # Last stage.
        self.phi_6 = _ImageOperator(3, kernel_size, dim_in)
        self.phit_6 = _ImageOperator(3, kernel_size, dim_in)
        self.r6 = nn.Parameter(torch.tensor([0.5]))
        self.shallow_feat7 = _ShallowFeatures(n_feat, kernel_size, reduction, bias, shared_act, dim_in)
        self.concat67 = _conv(2 * n_feat, n_feat + scale_orsnetfeats, kernel_size, dim_in, bias=bias)
        self.tail = _conv(n_feat + scale_orsnetfeats, 3, kernel_size, dim_in, bias=bias)

    def forward_stages(self, x: Tensor, z: Optional[Tensor] = None) -> list[Tensor]:
        """All ``depth + 2`` stage images (B,3,H,W), [0,1] domain, FINAL FIRST (stage order
        reversed, as in the reference); the reference loss weights them all equally."""
        image = _gradient_step(self.phi_0, self.phit_0, self.r0, x, x, z)
        skips, bottom = self.stage1_encoder(self.shallow_feat1(image, z), z)
        decoded = self.stage1_decoder(bottom, skips, z)
        sam_feats, image = self.sam12(decoded[-1], image, z)
        stages = [image]

        for _ in range(self.depth):
            sam_feats, image, skips, decoded = self.basic(x, image, skips, decoded, sam_feats, z)
            stages.append(image)

        image = _gradient_step(self.phi_6, self.phit_6, self.r6, image, x, z)
        feats = self.concat67(torch.cat([self.shallow_feat7(image, z), sam_feats], dim=1), z)
        # The last stage predicts a residual on the rainy input, not on its own GDM output.
        stages.append(x + self.tail(feats, z))
        return stages[::-1]

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x (B,3,H,W) in [0,1], z (B,dim_in) or None -> restored (B,3,H,W), not clamped."""
        return self.forward_stages(x, z)[0]
