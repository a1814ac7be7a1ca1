"""The fastest inference setting this machine supports: precision and memory format.

``recommended_setting(device)`` is what the benchmarks' ``recommended`` setting (and the deprecated
``test_model.py --recommended``) use:

- CUDA: bf16 autocast + channels-last (tensor cores);
- a CPU that computes bf16 natively (AMX or AVX-512 BF16: ``amx_bf16`` / ``avx512_bf16`` in
  ``/proc/cpuinfo``): bf16 autocast + channels-last, the memory format oneDNN's bf16 kernels work in;
- any other CPU: float32 (without native bf16 instructions autocast converts every operand and
  computes in float32 anyway), in the memory format that is faster for the model at hand:
  channels-last speeds up the dense convolutions of BRN, RCDNet and DGUNet on this project's
  CPU and slows down the depthwise ones of IDT and DRSformer, so ``faster_memory_format`` times both.

Every setting runs under ``torch.inference_mode`` (``utils.eval.inference.restore``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from models import size_multiple, tile_size

__all__ = ["Setting", "cpu_flags", "native_bf16", "recommended_setting", "cpu_model_name", "inference_setting",
           "default_setting", "setting_from_flags",
           "default_tile_batch", "faster_memory_format"]

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Setting:
    """An inference setting: autocast dtype name (None: float32) and memory format, with the reason."""
    amp: Optional[str]
    channels_last: bool
    reason: str = ""

    @property
    def label(self) -> str:
        parts = [self.amp or "fp32"] + (["channels_last"] if self.channels_last else [])
        return " + ".join(parts)


CPU_FLAGS_ENV = "COIC_CPU_FLAGS"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (empty when unreadable).

    ``$COIC_CPU_FLAGS`` (space-separated), when set, replaces what ``/proc/cpuinfo`` says: the test
    suite fixes it so that no test depends on the host's CPU, and a container that hides the flags
    can state them.
    """
    if cpuinfo == "/proc/cpuinfo" and os.environ.get(CPU_FLAGS_ENV):
        return set(os.environ[CPU_FLAGS_ENV].split())
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU model from ``cpuinfo`` (``model name``), else the platform's processor name."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def native_bf16(flags: Optional[set[str]] = None) -> bool:
    """Whether the CPU has bf16 arithmetic instructions (AMX or AVX-512 BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def recommended_setting(device: torch.device, flags: Optional[set[str]] = None, model: Optional[nn.Module] = None,
                        z: Optional[Tensor] = None) -> Setting:
    """The inference setting for ``device`` (see the module docstring); ``flags``: CPU flags for tests.

    On a CPU without native bf16, a ``model`` (with the code ``z`` it will run with, or None) is
    timed in both memory formats and the faster one is recommended (``faster_memory_format``).
    """
    if device.type == "cuda":
        return Setting("bf16", True, "CUDA: bf16 autocast on tensor cores, channels-last convolutions")
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        found = [f for f in NATIVE_BF16_FLAGS if f in flags]
        if found:
            return Setting("bf16", True, f"the CPU computes bf16 natively ({', '.join(found)}): bf16 autocast, "
                                         "channels-last for oneDNN's bf16 kernels")
        reason = "no native bf16 on this CPU (no amx_bf16/avx512_bf16 flag): float32"
        if model is None:
            return Setting(None, False, reason + ", default layout")
        channels_last, times = faster_memory_format(model, device, z)
        return Setting(None, channels_last, reason + f"; {'channels-last' if channels_last else 'default'} layout, "
                       f"the faster for this model here ({times['contiguous']:.0f} ms default, "
                       f"{times['channels_last']:.0f} ms channels-last, CPU time of a small input)")
    return Setting(None, False, f"{device.type}: float32, default layout")


def faster_memory_format(model: nn.Module, device: torch.device, z: Optional[Tensor] = None, side: int = 96,
                  repeats: int = 3, margin: float = 0.97) -> tuple[bool, dict[str, float]]:
    """Whether ``model`` runs faster in channels-last than in the default layout on ``device``.

    Times ``model(x, z)`` on a (1,3,side,side) input (the backbone's fixed tile, if it has one),
    each layout after one warm-up, alternating, best of ``repeats`` (CPU time of the process);
    channels-last only when it takes less than ``margin`` of the default layout's time.
    On this project's CPU channels-last is faster for BRN, RCDNet and DGUNet and slower for the
    depthwise convolutions of IDT and DRSformer (docs/speed.md), so it is measured, not assumed.
    Returns (channels_last, ms per layout); the model is left in the default layout.
    """
    import time

    multiple = size_multiple(model)
    side = tile_size(model) or max(multiple, side // multiple * multiple)
    x = torch.rand(1, 3, side, side, device=device)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    best = {name: float("inf") for name in formats}
    with torch.inference_mode():
        for attempt in range(repeats + 1):
            for name, fmt in formats.items():
                model.to(memory_format=fmt)
                xf = x.contiguous(memory_format=fmt)
                start = time.process_time()
                model(xf, z)
                if attempt:  # the first round is the warm-up
                    best[name] = min(best[name], 1000 * (time.process_time() - start))
    model.to(memory_format=torch.contiguous_format)
    return best["channels_last"] < margin * best["contiguous"], best


def default_setting(device: torch.device, model: Optional[nn.Module], coic: bool,
                    flags: Optional[set[str]] = None) -> Setting:
    """What ``test_model.py`` runs with when no precision flag is given.

    bf16 autocast + channels-last on a CPU that computes bf16 natively, for the modes whose bf16
    accuracy the backbone declares shown (``bf16_verified``: "plain", "coic"; measured by
    ``benchmarks/bf16_accuracy.py``: PSNR within 0.05 dB and NIQE within 0.05 of fp32). float32 in
    the default layout everywhere else (GPUs included, where it has not been measured).
    """
    mode = "coic" if coic else "plain"
    name = type(model).__name__ if model is not None else "this model"
    if device.type != "cpu" or not native_bf16(flags):
        return Setting(None, False, "float32 (bf16 is the default only on a CPU that computes it natively)")
    if mode not in getattr(model, "bf16_verified", ()):
        return Setting(None, False, f"float32: bf16 accuracy of {name}'s {mode} mode is not shown yet")
    return Setting("bf16", True, f"the CPU computes bf16 natively and {name}'s {mode} mode keeps PSNR within "
                                 "0.05 dB of float32 in it (--precision fp32 forces float32)")


def inference_setting(amp: str, channels_last: bool, use_recommended: bool, device: torch.device,
                      model: Optional[nn.Module] = None, z: Optional[Tensor] = None,
                      precision: str = "auto") -> Setting:
    """The setting a command runs with, logged with this machine's recommendation when the command
    does not use it. ``--recommended`` (its layout timed on ``model``) wins; then an explicit
    ``--amp``/``--channels_last``; then ``precision``: "fp32" forces float32, "bf16" is bf16 autocast +
    channels-last, "auto" is ``default_setting``."""
    import logging

    rec = recommended_setting(device, model=model if use_recommended else None, z=z)
    if use_recommended:
        chosen = rec
    elif amp not in (None, "off") or channels_last:
        chosen = Setting(None if amp in (None, "off") else amp, channels_last, "as the flags say")
    elif precision == "fp32":
        chosen = Setting(None, False, "--precision fp32")
    elif precision == "bf16":
        chosen = Setting("bf16", True, "--precision bf16")
    else:
        chosen = default_setting(device, model, z is not None)
    name = cpu_model_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    message = f"inference setting: {chosen.label} on {name}"
    if use_recommended or (chosen.amp, chosen.channels_last) == (rec.amp, rec.channels_last):
        message += f" (the recommended one: {rec.reason})"
    else:
        message += f"; recommended here: {rec.label} (--recommended; {rec.reason})"
    if chosen.reason and not use_recommended:
        message += f"; chosen: {chosen.reason}"
    logging.getLogger("coic.speed").info(message)
    return chosen


def setting_from_flags(precision: str, memory_format: str, device: torch.device, model: Optional[nn.Module] = None,
                       z: Optional[Tensor] = None) -> Setting:
    """The setting of ``--precision`` and ``--memory_format`` (``utils.cli.add_precision_args``), logged
    as ``inference_setting`` logs it.

    precision: "auto" is ``default_setting``; "fp32", "bf16", "fp16" that autocast type;
    "recommended" (the deprecated ``--recommended``) is ``recommended_setting``, layout included.
    memory_format: "auto" is channels-last with bf16/fp16 and the default layout with float32;
    "contiguous" and "channels_last" force that layout.
    """
    if precision == "recommended":
        return inference_setting("off", False, True, device, model, z)
    if precision == "auto" and memory_format == "auto":
        return inference_setting("off", False, False, device, model, z, "auto")
    amp = default_setting(device, model, z is not None).amp if precision == "auto" else (
        None if precision == "fp32" else precision)
    channels_last = amp is not None if memory_format == "auto" else memory_format == "channels_last"
    return inference_setting(amp or "off", channels_last, False, device, model, z, "fp32")


def default_tile_batch(device: torch.device) -> int:
    """Tiles per forward: batching fills a GPU, but on a CPU one tile at a time is fastest (IDT at
    512x512, CPU time: 25 s with 1 tile per forward, 33 s with 4, 64 s with all 25)."""
    return 1 if device.type == "cpu" else 4
