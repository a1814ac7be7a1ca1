"""CoI-M: context-based instance-level modulation of convolution kernels.

A modulated convolution keeps an ordinary kernel ``W`` and, when a code ``z`` is
given, rescales it per sample:

    [a | b | c] = MLP([z, mean_hw(x)])           a: (C_out,), b: (C_in/g,), c: (k*k,)
    att[o, i, :] = k*k * softmax_k(sigmoid(a_o + b_i) * c)
    W_n = W * att_n

(up to the published code's memory reading of ``att``, kept for its checkpoints: see
``_attention``).

All samples run as one grouped convolution (batch folded into the channel axis).
With ``z=None`` the layers are exactly ``nn.Conv2d`` / ``nn.ConvTranspose2d``.
Parameter names (``weight``, ``bias``, ``generator.{0,2,4}``) map one-to-one onto
the published code's ``base_conv.conv.*`` and ``g2pa_wgen.*`` (see
``utils.checkpoint.remap_published_keys``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ModulatedConv2d", "sibling_convs", "is_channels_last", "weight_is_channels_last", "channel_means",
           "ModulatedConvTranspose2d",
           "ContextEmbedding", "modulation_parameters", "context_embedding_parameters", "log_temperature"]


def _generator(dim_in: int, in_channels: int, hidden: int, out_features: int) -> nn.Sequential:
    """The three-layer MLP that turns ``[z, channel means]`` into ``[a | b | c]``."""
    return nn.Sequential(
        nn.Linear(dim_in + in_channels, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, 16),
        nn.ReLU(inplace=True),
        nn.Linear(16, out_features),
    )


def log_temperature(a_out: Tensor, b_in: Tensor, taps: Tensor) -> Tensor:
    """(B,) mean over (o, i) of log T, T = (1 / sigmoid(a_o + b_i)) / (mean(c - min c) + 1e-8).

    The softmax over the taps sees ``sigmoid(a_o + b_i) · c``: T is its temperature (the
    published ``Analysis/temperature_analysis.py``). Small T: a sharp softmax, strong
    modulation; large T: nearly flat. min and mean are over each sample's own c.
    """
    gate = a_out.unsqueeze(2) + b_in.unsqueeze(1)  # (B, C_out, C_in/g); the mean ignores the reading order
    spread = (taps - taps.amin(dim=-1, keepdim=True)).mean(dim=-1)
    return (-F.logsigmoid(gate)).flatten(1).mean(1) - torch.log(spread + 1e-8)


def _attention(rows: Tensor, cols: Tensor, taps: Tensor, shape: tuple) -> Tensor:
    """``k² · softmax_k(sigmoid(rows_r + cols_c) · taps)`` for (B,R), (B,C), (B,k²), read as ``shape``.

    The published layers build this (R, C) map with R the weight's *second* axis and then
    read its memory in the weight's own (dim0, dim1) order: a transposition when the two
    channel counts are equal, a fixed permutation otherwise. Checkpoints trained that way
    are only correct under the same reading, so we keep it.
    """
    gate = torch.sigmoid(rows.unsqueeze(2) + cols.unsqueeze(1))
    if gate.dtype == torch.float32 or gate.device.type != "cpu":
        # The published order, bit for bit: an untrained RCDNet's CoIC output (1e10 after 17 stages)
        # turns out entirely different from the published one after a one-ulp change here.
        logits = gate.unsqueeze(-1) * taps[:, None, None, :]
        return (torch.softmax(logits, dim=-1) * taps.shape[-1]).reshape(shape)
    # Under autocast on a CPU the taps lead, (B, k², R, C): a softmax over an outer axis is vectorized
    # along the R·C entries, where one over a last axis of 9 runs entry by entry. The reshape copies
    # into the (B, R, C, k²) order.
    logits = taps[:, :, None, None] * gate.unsqueeze(1)
    return (torch.softmax(logits, dim=1) * taps.shape[-1]).permute(0, 2, 3, 1).reshape(shape)


class ModulatedConv2d(nn.Conv2d):
    """Conv2d whose kernel is modulated per sample by a code ``z``.

    forward(x, z=None): x (B,C_in,H,W), z (B,dim_in) or None -> (B,C_out,H',W').
    1x1 kernels are never modulated (their generator exists only so that
    published checkpoints load). ``dim_in=0`` builds no generator: a plain conv that
    ignores z, the layout of backbones trained without CoIC.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, bias: bool = True,
                 dim_in: int = 128):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        k = self.kernel_size[0] * self.kernel_size[1]
        # The reference narrows the MLP for grouped/depthwise convolutions.
        hidden = out_channels // 16 if groups > 1 else out_channels
        self.generator = (_generator(dim_in, in_channels, hidden, in_channels // groups + out_channels + k)
                          if dim_in > 0 else None)

    @property
    def modulated(self) -> bool:
        return self.generator is not None and self.kernel_size[0] * self.kernel_size[1] > 1

    def modulation_codes(self, x: Tensor, z: Tensor, mean: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The generator's (a (B,C_out), b (B,C_in/g), c (B,k²)) for input x and code z
        (``mean``: x's channel means (B,C_in), when the caller has them already)."""
        c_out, c_in = self.out_channels, self.in_channels // self.groups
        mean = channel_means(x) if mean is None else mean
        code = self.generator(torch.cat([z, mean], dim=-1))
        a_out, b_in, taps = code.split([c_out, c_in, code.shape[-1] - c_out - c_in], dim=-1)
        return a_out, b_in, taps

    def kernel_attention(self, x: Tensor, z: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        """Per-sample kernel multipliers (B, C_out, C_in/g, kh, kw)."""
        a_out, b_in, taps = self.modulation_codes(x, z, mean)
        return _attention(b_in, a_out, taps, (-1, self.out_channels, self.in_channels // self.groups,
                                              *self.kernel_size))

    @property
    def _channel_scale(self) -> bool:
        """A depthwise 1x1 conv: a per-channel scale (and shift)."""
        return (self.kernel_size == (1, 1) and self.groups == self.in_channels == self.out_channels
                and self.stride == (1, 1) and self.padding == (0, 0) and self.padding_mode == "zeros")

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if z is None or not self.modulated:
            if self._channel_scale:
                # The same products as the conv, without the CPU convolution's loop over the
                # channels one group at a time (96 small GEMMs per call in DRSformer's experts).
                out = x * self.weight.view(1, -1, 1, 1)
                return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
            if self.padding_mode != "zeros":
                return super().forward(x)
            return _conv2d(self, x, self.weight, self.bias, self.groups)
        return _per_sample_conv(self, x, self.sample_weight(x, z), self.bias)

    def sample_weight(self, x: Tensor, z: Tensor, mean: Optional[Tensor] = None) -> Tensor:
        """The kernel each sample is convolved with: W * att, (B, C_out, C_in/g, kh, kw)."""
        return self.weight.unsqueeze(0) * self.kernel_attention(x, z, mean)


def channel_means(x: Tensor) -> Tensor:
    """(B,C,H,W) -> (B,C): the means over H and W that the generators read, in x's dtype.

    ``mean`` of a bf16 map first converts the whole map to float32. A bf16 map in channels-last
    (the inference setting) is summed as it is instead: the sum accumulates in float32 inside the
    kernel, so the result differs from ``mean`` by at most one more bf16 rounding, and BRN's CoIC
    forward at 256² spends 8 % less time. Training (default layout) and float16 keep ``mean``: a
    float16 sum of a large map overflows.
    """
    if x.dtype == torch.bfloat16 and is_channels_last(x):
        return x.sum(dim=(-2, -1)) / (x.shape[-2] * x.shape[-1])
    return x.mean(dim=(-2, -1))


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels-last (and not also in the default layout)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _layout_of(layer: nn.Module, weight: Tensor) -> Tensor:
    """A per-sample ``weight`` in the memory format of ``layer.weight``.

    ``model.to(memory_format=torch.channels_last)`` makes every layer's weight channels-last, and
    oneDNN gives a channels-last output when the input or the weight is one, so a model in
    channels-last stays in it. One layer's per-sample kernels inherit the layout from its weight;
    the kernels that :func:`sibling_convs` stacks do not, and a default-layout input (BRN's first
    hidden state) then gave a default-layout output that every later layer copied.
    """
    if not weight_is_channels_last(layer):
        return weight
    if weight.shape[1] == 1:
        # A depthwise kernel (C,1,kh,kw) is the same memory in both layouts, and PyTorch reads its
        # layout from the strides alone: the per-sample kernels get the channels-last ones on the same
        # memory, so oneDNN keeps a channels-last map channels-last (IDT's LeFF: no layout copy).
        return weight.contiguous().as_strided(weight.shape, _channels_last_strides(weight.shape))
    return weight.contiguous(memory_format=torch.channels_last)


def weight_is_channels_last(layer: nn.Module) -> bool:
    """Whether ``layer``'s 4-d weight was made channels-last (``model.to(memory_format=...)``), including a
    depthwise (C,1,kh,kw) kernel, which ``is_channels_last`` cannot tell apart (the same memory in both
    layouts) but whose strides differ."""
    w = layer.weight
    return w.dim() == 4 and (is_channels_last(w) or (w.shape[1] == 1 and w.stride() == _channels_last_strides(w.shape)))


def _channels_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c)


def _per_sample_conv(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (B,C_in,H,W) convolved, sample n with weight[n] (B,C_out,C_in/g,kh,kw) and the shared bias
    (C_out,), as one grouped convolution with the batch folded into the channels (``conv``'s geometry)."""
    b = x.shape[0]
    bias = bias.repeat(b) if bias is not None else None
    out = _conv2d(conv, _fold_batch(x), _layout_of(conv, weight.flatten(0, 1)), bias, b * conv.groups)
    return _unfold_batch(out, b)


def _conv2d(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """``F.conv2d`` with ``conv``'s stride, padding and dilation (zero padding).

    On a CPU, a grouped convolution with one output and several inputs per group (DRSformer's
    second feed-forward stage: two inputs per group) runs as a depthwise convolution over every
    input channel, whose consecutive outputs are then summed: the same products, added in another
    order, because oneDNN's grouped kernel for several inputs per group is several times slower than
    its depthwise one.
    """
    per_group = weight.shape[1]
    if x.device.type != "cpu" or per_group == 1 or weight.shape[0] != groups:
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
    depthwise = F.conv2d(x, weight.reshape(-1, 1, *weight.shape[-2:]), None, conv.stride, conv.padding,
                         conv.dilation, groups * per_group)
    out = depthwise[:, 0::per_group] + depthwise[:, 1::per_group]
    for i in range(2, per_group):
        out = out + depthwise[:, i::per_group]
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _fold_batch(x: Tensor) -> Tensor:
    """(B,C,H,W) -> (1,B*C,H,W); x itself at batch 1.

    A view of x to its own shape gets a batch stride of C, and PyTorch then no longer reads a
    channels-last tensor as channels-last (``suggest_memory_format``): every concatenation with it
    would fall back to the default layout and copy, and so would the convolution after it.
    """
    return x if x.shape[0] == 1 else x.reshape(1, -1, *x.shape[-2:])


def _unfold_batch(out: Tensor, b: int) -> Tensor:
    """(1,B*C,H,W) -> (B,C,H,W); ``out`` itself at batch 1 (see :func:`_fold_batch`)."""
    return out if b == 1 else out.view(b, -1, *out.shape[-2:])


def sibling_convs(convs: Sequence[ModulatedConv2d], x: Tensor, z: Optional[Tensor] = None) -> Tensor:
    """``torch.cat([conv(x, z) for conv in convs], 1)`` as one convolution.

    The convolutions read the same input, so their kernels are stacked along the output channels
    and x is read once (and its channel means once, for the generators). Each output channel is
    the same dot product as in its own convolution: on a CPU oneDNN gives the same bits, and one
    wide convolution runs faster than several narrow ones. The convolutions must agree in
    everything but their output channels.
    """
    def geometry(c: ModulatedConv2d) -> tuple:
        return (c.in_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups, c.padding_mode,
                c.bias is None, c.modulated)

    first = convs[0]
    if first.groups != 1 or first.padding_mode != "zeros" or any(geometry(c) != geometry(first) for c in convs):
        raise ValueError("sibling_convs: the convolutions differ in more than their output channels")
    bias = torch.cat([c.bias for c in convs]) if first.bias is not None else None
    if z is None or not first.modulated:
        return F.conv2d(x, torch.cat([c.weight for c in convs]), bias, first.stride, first.padding, first.dilation)
    mean = channel_means(x)
    return _per_sample_conv(first, x, torch.cat([c.sample_weight(x, z, mean) for c in convs], 1), bias)


class ModulatedConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d (groups=1) whose kernel is modulated per sample by ``z``.

    forward(x, z=None): x (B,C_in,H,W) -> (B,C_out,H',W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, bias: bool = True, dim_in: int = 128):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias)
        k = self.kernel_size[0] * self.kernel_size[1]
        self.generator = (_generator(dim_in, in_channels, out_channels, in_channels + out_channels + k)
                          if dim_in > 0 else None)

    @property
    def modulated(self) -> bool:
        return self.generator is not None and self.kernel_size[0] * self.kernel_size[1] > 1

    def modulation_codes(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The generator's (a (B,C_out), b (B,C_in), c (B,k²)); the published split is [b | a | c]."""
        c_in, c_out = self.in_channels, self.out_channels
        code = self.generator(torch.cat([z, channel_means(x)], dim=-1))
        b_in, a_out, taps = code.split([c_in, c_out, code.shape[-1] - c_in - c_out], dim=-1)
        return a_out, b_in, taps

    def kernel_attention(self, x: Tensor, z: Tensor) -> Tensor:
        """Per-sample kernel multipliers shaped like the weight: (B, C_in, C_out, kh, kw)."""
        a_out, b_in, taps = self.modulation_codes(x, z)
        return _attention(a_out, b_in, taps, (-1, self.in_channels, self.out_channels, *self.kernel_size))

    def forward(self, x: Tensor, z: Optional[Tensor] = None, output_size=None) -> Tensor:
        if z is None or not self.modulated:
            return super().forward(x, output_size)
        b = x.shape[0]
        weight = (self.weight.unsqueeze(0) * self.kernel_attention(x, z)).flatten(0, 1)
        bias = self.bias.repeat(b) if self.bias is not None else None
        out = F.conv_transpose2d(_fold_batch(x), _layout_of(self, weight), bias, self.stride, self.padding,
                                 self.output_padding, groups=b, dilation=self.dilation)
        return _unfold_batch(out, b)


def modulation_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every CoI-M generator in ``module`` (found by type, not by name)."""
    params: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, (ModulatedConv2d, ModulatedConvTranspose2d)):
            if m.generator is not None:
                params.extend(m.generator.parameters())
    return params


class ContextEmbedding(nn.Module):
    """Projects the CoIC code into a feature space: ``Linear(SiLU(z))``.

    forward(z): z (B,dim_in) -> (B,dim). Used by the transformer backbones (IDT, DRSformer);
    the optimiser split finds these layers by type (see :func:`context_embedding_parameters`).
    """

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.proj(F.silu(z))


def context_embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every :class:`ContextEmbedding` inside ``module``."""
    return [p for m in module.modules() if isinstance(m, ContextEmbedding) for p in m.parameters()]
