"""What the machine can do, beside what the networks do: the rate of a plain 3×3 convolution and
the cost of a modulated one.

The backbones are mostly 3×3 convolutions, so the rate of one plain 3×3 convolution (32 → 32
channels on a 256² map, channels-last, batch 1) in fp32 and in bf16 is the ceiling a network can
approach on this machine. ``benchmarks.inference`` measures it in the same run as the networks and
reports each network's GFLOP/s (convolutions and matrix products, ``torch.utils.flop_counter``) as a
share of the rate of its precision.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Sequence

import torch

from models import BACKBONES, ConvShape


class _ConvShapes(Mapping):
    """name -> (in, out, kernel, stride, groups): each backbone's costliest modulated convolution, as its
    registry entry declares it (``costliest_conv``)."""

    def __getitem__(self, name: str) -> ConvShape:
        return BACKBONES[name].costliest_conv

    def __iter__(self) -> Iterator[str]:
        return iter(BACKBONES)

    def __len__(self) -> int:
        return len(BACKBONES)


CONV_SHAPES: Mapping[str, ConvShape] = _ConvShapes()

RATE_CHANNELS, RATE_SIDE = 32, 256


def conv3x3_flops(channels: int, side: int) -> int:
    """FLOPs of one 3×3 convolution, ``channels`` → ``channels``, stride 1, on a side² map (2 per MAC)."""
    return 2 * channels * channels * 9 * side * side


def conv_rate(dtype: torch.dtype, threads: int, rounds: int = 5, channels: int = RATE_CHANNELS,
              side: int = RATE_SIDE) -> float:
    """GFLOP/s of a plain 3×3 convolution in ``dtype`` (channels-last, batch 1, no bias) on the CPU:
    the median of ``rounds`` timed calls after two untimed ones, on ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    conv = conv.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.rand(1, channels, side, side).to(dtype=dtype, memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(2 + rounds):
            start = time.perf_counter()
            conv(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return conv3x3_flops(channels, side) / statistics.median(times) / 1e9


def conv_check(size: int, rounds: int, threads: int, names: Sequence[str]) -> list[dict]:
    """ms of a plain conv and of the same conv modulated by z (batch 1, same weights), alternating."""
    from models.coim import ModulatedConv2d

    torch.set_num_threads(threads)
    rows = []
    for name in names:
        cin, cout, k, stride, groups = CONV_SHAPES[name]
        torch.manual_seed(0)
        conv = ModulatedConv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups).eval()
        x, z = torch.rand(1, cin, size, size), torch.nn.functional.normalize(torch.randn(1, 128), dim=1)
        plain, modulated = [], []
        with torch.inference_mode():
            conv(x), conv(x, z)
            for _ in range(rounds):
                for code, out in ((None, plain), (z, modulated)):
                    t = time.process_time()
                    conv(x, code)
                    out.append(time.process_time() - t)
        p, m = 1000 * statistics.median(plain), 1000 * statistics.median(modulated)
        rows.append({"backbone": name, "shape": f"{cin}->{cout}, {k}x{k}, groups {groups}, {size}x{size}",
                     "plain_ms": p, "modulated_ms": m, "ratio": m / p})
    return rows
