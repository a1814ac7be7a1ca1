"""The rain-/detail-aware encoder and its MoCo wrapper.

``RainDetailEncoder`` (after AirNet's encoder): conv3x3 3->32, three residual blocks that
halve the resolution and double the channels (32->64->128->256), global average pooling
and an MLP 256->128->128. It returns the unit code z and the channel-normalised feature
map used by the contrastive loss.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ResidualDownBlock(nn.Module):
    """conv(s2)-BN-LReLU-conv-BN plus a strided 1x1 shortcut, then LReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        # ``block``/``short_cut`` are the published names (encoder checkpoints load as-is).
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.short_cut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.block(x) + self.short_cut(x), 0.1)


class RainDetailEncoder(nn.Module):
    """x (B,3,H,W) in [0,1] -> (z (B,dim) unit vectors, features (B,8*width,H/8,W/8) unit along C)."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1)
        self.resblock = nn.Sequential(
            ResidualDownBlock(width, 2 * width),
            ResidualDownBlock(2 * width, 4 * width),
            ResidualDownBlock(4 * width, 8 * width),
        )
        self.mlp = nn.Sequential(nn.Linear(8 * width, dim), nn.LeakyReLU(0.1, inplace=True), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.resblock(self.conv1(x))
        z = F.normalize(self.mlp(feat.mean(dim=(-2, -1))), dim=-1)
        return z, F.normalize(feat, dim=1)


class ContrastiveEncoder(nn.Module):
    """MoCo pair of encoders (He et al., 2020) as CoIC trains them.

    The query encoder is trained by back-propagation; the key encoder follows it by an
    exponential moving average (momentum ``m``). ``forward(x)`` returns z from the key
    encoder, which is what inference uses.
    """

    def __init__(self, width: int = 32, dim: int = 128, momentum: float = 0.999, temperature: float = 1.0):
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        self.encoder_q = RainDetailEncoder(width, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.encoder_q.mlp[-1].out_features

    def forward(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) in [0,1] -> z (B,dim) from the key encoder."""
        return self.encoder_k(x)[0]

    @torch.no_grad()
    def momentum_update(self) -> None:
        for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    def contrast(self, query: Tensor, positive: Tensor, negatives: Tensor,
                 update_keys: bool = True) -> tuple[Tensor, Tensor]:
        """One MoCo step.

        query, positive: (B,3,h,w); negatives: (B,N,3,h,w), all in [0,1].
        Returns logits (B,1+N) with the positive at index 0, and the query code z (B,dim).
        A logit is ``<q_map, k_map> / (h'*w') / temperature`` over the feature maps.
        ``update_keys``: run the momentum update first, as the reference's forward does (the
        Trainer's step calls :meth:`momentum_update` itself and passes False).
        """
        b, n = negatives.shape[:2]
        z, q_feat = self.encoder_q(query)
        with torch.no_grad():
            if update_keys:  # before the keys are computed, as in the reference
                self.momentum_update()
            _, k_feat = self.encoder_k(torch.cat([positive, negatives.flatten(0, 1)], dim=0))
        area = q_feat.shape[-2] * q_feat.shape[-1]
        q_flat = q_feat.flatten(1)
        k_flat = k_feat.flatten(1)
        l_pos = (q_flat * k_flat[:b]).sum(-1, keepdim=True)
        l_neg = torch.einsum("bd,bnd->bn", q_flat, k_flat[b:].view(b, n, -1))
        logits = torch.cat([l_pos, l_neg], dim=1) / (area * self.temperature)
        return logits, z
