"""BRN: bilateral recurrent network (Ren et al., TIP 2020) with CoI-M convolutions.

Two LSTM-gated recurrent branches run for ``inter_iter`` steps: the rain branch estimates
the rain layer r, the image branch the background x, each feeding the other.
Every 3x3 convolution is a ``ModulatedConv2d``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from models.coim import ModulatedConv2d, is_channels_last, sibling_convs

# In place: each is applied to a convolution's fresh output, which nothing else reads (and whose
# backward does not need it), so no second map is written.
_ACTIVATIONS = {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_, None: lambda t: t}


def _cell_tanh(c: Tensor, h_dtype: torch.dtype) -> Tensor:
    """tanh(c) of a cell state. Under autocast on a CPU (c float32, h bf16/fp16) as 2·sigmoid(2c) - 1:
    PyTorch's float32 tanh is several times slower than its sigmoid there, and the difference (1.8e-7
    at most) is far under the rounding of h. Float32 throughout, and any GPU, keep torch.tanh, the
    published computation."""
    if c.dtype == h_dtype or c.device.type != "cpu":
        return torch.tanh(c)
    return 2 * torch.sigmoid(2 * c) - 1


class ConvAct(nn.Module):
    """3x3 modulated conv followed by an activation."""

    def __init__(self, in_channels: int, out_channels: int, act: Optional[str], dim_in: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, 1, 1, dim_in=dim_in)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return self.act(self.conv(x, z))


class DoubleConv(nn.Module):
    """conv-ReLU-conv-ReLU; the caller adds the skip connection."""

    def __init__(self, channels: int, dim_in: int):
        super().__init__()
        self.conv1 = ModulatedConv2d(channels, channels, 3, 1, 1, dim_in=dim_in)
        self.conv2 = ModulatedConv2d(channels, channels, 3, 1, 1, dim_in=dim_in)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return torch.relu_(self.conv2(torch.relu_(self.conv1(x, z)), z))


class _Branch(nn.Module):
    """One recurrent branch: input conv, LSTM gates, residual blocks, output conv."""

    def __init__(self, in_channels: int, width: int, num_res: int, dim_in: int, suffix: str):
        super().__init__()
        # Attribute names follow the published BRN so that its checkpoints load unchanged.
        self._suffix = suffix
        self.add_module(f"conv0{suffix}", ConvAct(in_channels, width, "relu", dim_in))
        for gate, act in (("i", "sigmoid"), ("f", "sigmoid"), ("g", "tanh"), ("o", "sigmoid")):
            self.add_module(f"conv_{gate}{suffix}", ConvAct(3 * width, width, act, dim_in))
        for k in range(1, num_res + 1):
            self.add_module(f"res_conv{k}{suffix}", DoubleConv(width, dim_in))
        self.add_module(f"conv{suffix}", ConvAct(width, 3, None, dim_in))
        self.num_res = num_res
        self.width = width

    def get(self, name: str) -> nn.Module:
        return getattr(self, name + self._suffix)

    def forward(self, inp: Tensor, h: Tensor, c: Tensor, h_other: Tensor, z: Optional[Tensor]):
        feat = torch.cat([self.get("conv0")(inp, z), h, h_other], dim=1)
        # The four gates read the same features: one convolution of 4 x width channels. One sigmoid
        # over the whole dense map is faster than three over channel slices (strided in channels-last);
        # the cell candidate g takes the tanh of its own slice first, as its ConvAct would.
        gates = sibling_convs([self.get(f"conv_{gate}").conv for gate in "ifgo"], feat, z)
        g = torch.tanh(gates[:, 2 * self.width:3 * self.width])
        i, f, _, o = gates.sigmoid_().split(self.width, dim=1)
        c = f * c + i * g
        h = (o * _cell_tanh(c, o.dtype)).to(o.dtype)  # o: the convolutions' dtype (c may be float32)
        y = h
        for k in range(1, self.num_res + 1):
            y = torch.relu_(self.get(f"res_conv{k}")(y, z) + y)
        return self.get("conv")(y, z), h, c


class BRN(nn.Module):
    """Bilateral recurrent deraining network.

    forward(x, z=None): x (B,3,H,W) in [0,1] -> derained (B,3,H,W), [0,1] domain, not clamped.
    ``dim_in=0`` builds the plain BRN (no CoI-M generators), the layout of BRN checkpoints
    trained without CoIC.
    """

    size_multiple = 1
    tile_size = None
    # Every convolution reads a channels-last map when the model and its input are channels-last
    # (tests/test_models_contract.py holds it to that).
    channels_last_throughout = True
    # Modes whose bf16 + channels-last output is shown as accurate as float32 (per rain type, mean PSNR
    # within 0.05 dB and mean NIQE within 0.05: benchmarks/bf16_accuracy.py on the published baseline).
    bf16_verified = ("plain",)

    def __init__(self, inter_iter: int = 8, dim_in: int = 128, width: int = 32):
        super().__init__()
        self.inter_iter = inter_iter
        self.width = width
        image = _Branch(9, width, 5, dim_in, "")
        rain = _Branch(6, width, 3, dim_in, "_r")
        # Register the layers flat on the model (published key names: conv0, conv_i_r, ...).
        for branch in (image, rain):
            for name, module in branch.named_children():
                self.add_module(name, module)
        self._branches = {"x": image, "r": rain}

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        # Mixed precision as for any LSTM: the cell states c (accumulators) in x's dtype, the hidden
        # states h in the dtype the convolutions compute in. Under bf16 autocast a float32 h would
        # promote every concatenation and residual sum to float32 (twice the memory traffic, and a
        # cast before each convolution). Without autocast both are x's dtype.
        dev = x.device.type
        state = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        # zeros in x's layout: a model in channels-last stays in it from the first iteration
        c = c_r = torch.empty(x.shape[0], self.width, *x.shape[-2:], dtype=x.dtype, device=x.device,
                              memory_format=layout).zero_()
        h = h_r = c.to(state)
        out, rain = x, x
        image, rain_branch = self._branches["x"], self._branches["r"]
        for _ in range(self.inter_iter):
            rain, h_r, c_r = rain_branch(torch.cat([x, rain], 1), h_r, c_r, h, z)
            out, h, c = image(torch.cat([x, out, rain], 1), h, c, h_r, z)
        return out

    @staticmethod
    def remap_legacy_keys(state: dict) -> dict:
        """Map the original BRN layout (``Sequential(conv, act)``: ``conv0.0.*``,
        ``res_conv1.{0,2}.*``) onto ours (``conv0.conv.*``, ``res_conv1.conv{1,2}.*``)."""
        out = {}
        for key, value in state.items():
            key = re.sub(r"^(res_conv\d(?:_r)?)\.0\.", r"\1.conv1.", key)
            key = re.sub(r"^(res_conv\d(?:_r)?)\.2\.", r"\1.conv2.", key)
            key = re.sub(r"^(conv\w*)\.0\.", r"\1.conv.", key)
            out[key] = value
        return out
