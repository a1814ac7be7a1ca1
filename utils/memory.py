"""Memory budgets for inference: what there is, what a forward needs, which tile fits (``--max_memory``).

The planner estimates the memory of restoring an image as

    now (process RSS on a CPU, allocated tensors on a GPU) + image buffers + activations(tile)

and picks the whole image, else the largest tile (or, for backbones with a fixed tile, the
largest batch of tiles) whose estimate fits the budget. ``activations`` counts the bytes of every
tensor alive during one forward of a *meta-device* copy of the model (shapes only, nothing is
computed; exact for the tensors the operators return), times a factor for what the kernels
allocate on their own (oneDNN layout copies, im2col buffers, allocator slack): measured once per
model on the real device at a small size when the plan is tight, else the conservative default.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import logging
import math
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from utils.errors import UserError

logger = logging.getLogger("coic.memory")

__all__ = ["parse_size", "format_size", "available_memory", "current_usage", "default_budget",
           "LiveTensorBytes", "forward_peak_bytes", "measured_peak", "TilePlan", "MemoryPlanner"]

MiB, GiB = 2 ** 20, 2 ** 30
DEFAULT_SHARE = {"cpu": 0.6, "cuda": 0.85}  # of the memory available when the run starts
KERNEL_FACTOR = 2.5  # real / counted activations before a measurement (1.3-2.2 measured on a CPU)
MARGIN = 1.15        # on top of a measured factor
RESERVE = 128 * MiB  # allocator and library slack per forward
# Bytes per image pixel besides the model's activations. CPU: the float input, the next image
# being decoded, a padded copy, the blended output and its weights, up to two outputs waiting to
# be written; scoring against ground truth adds the clean image and float64 metric maps. GPU:
# the input, a padded copy, the output and weights.
IMAGE_BYTES_PER_PIXEL = {"cpu": 100, "cuda": 40}
SCORING_BYTES_PER_PIXEL = 100
MAX_TILE_BATCH = 16
CALIBRATION_SIDE = 192


def parse_size(text: str, flag: str = "--max_memory") -> int:
    """Bytes of ``text``: ``12G``, ``12GiB``, ``800M``, ``1.5g``, or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise UserError(f"{flag} {text!r} is not a size; write it like 8G, 1500M or 0.5G")
    scale = {"": 1, "k": 2 ** 10, "m": MiB, "g": GiB, "t": 2 ** 40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _proc_kib(path: str, field: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device) -> int:
    """Bytes the run could still take: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    if kib is not None:
        return kib * 1024
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def current_usage(device: torch.device) -> int:
    """Bytes the run holds now: allocated GPU tensors, or this process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = _proc_kib("/proc/self/status", "VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_budget(device: torch.device) -> int:
    """What ``--max_memory`` defaults to: what the run holds plus a safe share of what is free."""
    share = DEFAULT_SHARE.get(device.type, DEFAULT_SHARE["cpu"])
    return int(current_usage(device) + share * available_memory(device))


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors created under it that are alive at once; ``peak`` is the most.

    A storage counts from the first operator that returns it until the last tensor on it is
    released. Inputs and parameters made outside are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._refs:
                    self._refs[key], self._bytes[key] = 0, storage.nbytes()
                    self.live += self._bytes[key]
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def forward_peak_bytes(model: nn.Module, shape: tuple, z: Optional[Tensor] = None,
                       memory_format=torch.contiguous_format) -> int:
    """Peak bytes of the tensors a forward of ``model`` on an input of ``shape`` creates (meta device).

    ``model`` may be a meta copy already. z (1,dim) or None is expanded to the batch.
    """
    twin = model if next(model.parameters()).is_meta else copy.deepcopy(model).to("meta")
    x = torch.empty(shape, device="meta").contiguous(memory_format=memory_format)
    code = None if z is None else torch.empty(z.shape[-1], device="meta").expand(shape[0], -1)
    # Counted in the model's own dtype (autocast does not act on meta tensors): a bf16 run needs
    # less, which the measured factor of ``MemoryPlanner.calibrate`` takes into account.
    with torch.inference_mode(), LiveTensorBytes() as counter:
        twin(x, code)
    return counter.peak


def measured_peak(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes by which ``fn`` raised the peak above the memory held before it; None where unknown.

    GPU: ``max_memory_allocated``. CPU (Linux): freed heap pages are returned first
    (``malloc_trim``) and the resident high-water mark is reset (``/proc/self/clear_refs``), so
    the rise of ``VmHWM`` is what ``fn`` took.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _proc_kib("/proc/self/status", "VmRSS")
    fn()
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return None if base is None or peak is None else (peak - base) * 1024


@dataclass(frozen=True)
class TilePlan:
    """How to restore one image: ``tile`` None = whole; ``batch`` tiles per forward; the estimate."""
    tile: Optional[int]
    batch: int
    estimate: int

    def describe(self) -> str:
        what = "whole image" if self.tile is None else f"tiles of {self.tile}x{self.tile}, {self.batch} per forward"
        return f"{what} (estimated peak {format_size(self.estimate)})"


class MemoryPlanner:
    """Plans tiles for ``model`` under ``budget`` bytes on ``device`` (see the module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device, budget: int, overlap: int = 32,
                 amp: Optional[torch.dtype] = None, memory_format=torch.contiguous_format):
        self.model, self.device, self.budget, self.overlap = model, device, budget, overlap
        self.amp, self.memory_format = amp, memory_format
        self.multiple = getattr(model, "size_multiple", 1)
        self.own_tile = getattr(model, "tile_size", None)
        self._twin: Optional[nn.Module] = None
        self._per_pixel: dict[bool, float] = {}  # modulated -> counted bytes per input pixel
        self.factor: dict[bool, float] = {}      # modulated -> measured real / counted
        self.shrink = 1.0                        # lowered after an out-of-memory error
        self._announced: Optional[tuple] = None

    def announce(self, plan: "TilePlan", h: int, w: int) -> None:
        """Log the plan when it differs from the previous image's."""
        if (plan.tile, plan.batch) != self._announced:
            self._announced = (plan.tile, plan.batch)
            logger.info("%dx%d image: %s, within --max_memory %s", w, h, plan.describe(), format_size(self.budget))

    # ---------------------------------------------------------------- estimates
    def _counted(self, side_h: int, side_w: int, z: Optional[Tensor]) -> float:
        """Counted activation bytes of a (1,3,h,w) forward, scaled from one meta run per mode (the
        activations of these networks grow with the pixels; a batch of n tiles needs n times one)."""
        key = z is not None
        if key not in self._per_pixel:
            if self._twin is None:
                self._twin = copy.deepcopy(self.model).to("meta")
            side = self.own_tile or CALIBRATION_SIDE
            side = max(self.multiple, side // self.multiple * self.multiple)
            peak = forward_peak_bytes(self._twin, (1, 3, side, side), z, self.memory_format)
            self._per_pixel[key] = peak / (side * side)
        return self._per_pixel[key] * side_h * side_w

    def _activations(self, h: int, w: int, z: Optional[Tensor]) -> float:
        factor = self.factor.get(z is not None)
        factor = KERNEL_FACTOR if factor is None else factor * MARGIN
        return factor * self._counted(h, w, z) + RESERVE

    def calibrate(self, z: Optional[Tensor]) -> None:
        """Measure the real peak of one forward at a small size; sets ``factor`` for this mode."""
        if (z is not None) in self.factor:
            return
        side = self.own_tile or max(self.multiple, CALIBRATION_SIDE // self.multiple * self.multiple)
        x = torch.rand(1, 3, side, side, device=self.device).contiguous(memory_format=self.memory_format)

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                                                        enabled=self.amp is not None):
                self.model(x, z)

        forward()  # one-time costs of the first call (kernel caches) are not the model's
        real = measured_peak(forward, self.device)
        if real is not None:
            self.factor[z is not None] = max(0.25, real / max(self._counted(side, side, z), 1.0))
            logger.debug("memory factor %.2f (%s)", self.factor[z is not None], "CoIC" if z is not None else "plain")

    def _fixed(self, h: int, w: int, scored: bool) -> int:
        per_pixel = IMAGE_BYTES_PER_PIXEL.get(self.device.type, IMAGE_BYTES_PER_PIXEL["cpu"])
        if scored and self.device.type != "cuda":
            per_pixel += SCORING_BYTES_PER_PIXEL
        return current_usage(self.device) + per_pixel * h * w

    # ---------------------------------------------------------------- the plan
    def plan(self, h: int, w: int, z: Optional[Tensor] = None, scored: bool = False) -> TilePlan:
        """The plan for an (h, w) image (z: its code, or None for plain restoration)."""
        fixed = self._fixed(h, w, scored)
        room = self.budget * self.shrink - fixed
        if room <= 0:
            raise UserError(f"--max_memory {format_size(self.budget)} is less than the run already holds plus a "
                            f"{w}x{h} image ({format_size(fixed)}); raise --max_memory")
        name = type(self.model).__name__
        if self.own_tile is not None:
            self.calibrate(z)
            one = self._activations(self.own_tile, self.own_tile, z) - RESERVE
            per_batch = [one * b + RESERVE for b in range(1, MAX_TILE_BATCH + 1)]
            fitting = [b for b, est in enumerate(per_batch, 1) if est <= room]
            if not fitting:
                raise UserError(f"--max_memory {format_size(self.budget)} is too small for {name}: one "
                                f"{self.own_tile}x{self.own_tile} tile needs about {format_size(fixed + per_batch[0])}")
            return TilePlan(self.own_tile, fitting[-1], int(fixed + per_batch[fitting[-1] - 1]))
        ph, pw = (math.ceil(s / self.multiple) * self.multiple for s in (h, w))
        whole = self._activations(ph, pw, z)
        if whole > room and (z is not None) not in self.factor:
            self.calibrate(z)  # tight: measure instead of assuming the default factor
            whole = self._activations(ph, pw, z)
        if whole <= room:
            return TilePlan(None, 1, int(fixed + whole))
        smallest = math.ceil(max(2 * self.overlap + self.multiple, 64) / self.multiple) * self.multiple
        per_pixel = (self._activations(1024, 1024, z) - RESERVE) / 1024 ** 2
        side = int(math.sqrt(max(room - RESERVE, 0) / per_pixel)) // self.multiple * self.multiple
        side = min(side, max(ph, pw))
        if side < smallest:
            raise UserError(f"--max_memory {format_size(self.budget)} is too small for {name} on a {w}x{h} image: "
                            f"a {smallest}x{smallest} tile needs about "
                            f"{format_size(fixed + self._activations(smallest, smallest, z))}")
        return TilePlan(side, 1, int(fixed + self._activations(side, side, z)))

    def smaller(self, plan: TilePlan, h: int, w: int) -> Optional[TilePlan]:
        """The next plan after running out of memory with ``plan``: half the batch, else tiles of
        half the side (the whole image becomes tiles of half its longer side); None at the floor."""
        if plan.batch > 1:
            return TilePlan(plan.tile, plan.batch // 2, plan.estimate)
        side = max(h, w) if plan.tile is None else plan.tile
        if self.own_tile is not None:
            return None
        half = side // 2 // self.multiple * self.multiple
        if half < max(2 * self.overlap + self.multiple, 64):
            return None
        return TilePlan(half, 1, plan.estimate)
