"""Memory budgets for inference: what there is, what a forward needs, which tile fits (``--max_memory``).

The planner estimates the memory of restoring an image as

    now (process RSS on a CPU, allocated tensors on a GPU) + image buffers + activations(tile)

and picks the whole image, else the number of tiles that the largest fitting tile gives, at the
smallest side that needs no more of them (``utils.tiling.fewest_pixels_tile``; for backbones with a
fixed tile, the largest batch of tiles) whose estimate fits the budget. ``activations`` is measured on the device,
once per model and mode: the peak one forward adds (resident memory on a CPU,
``max_memory_allocated`` on a GPU) of a small input (``PROBE_SIDES``, or the fixed tile). The
activations of these networks grow with the pixels, so two sizes give the line ``a + b * pixels``;
the first probe alone bounds it from above (``b <= peak / pixels``), which settles every image that
fits whole even so, and the second runs only when the plan is tight. Where no peak can be read,
the bytes of the tensors alive at once are counted (``LiveTensorBytes``) and multiplied by
``KERNEL_FACTOR`` for what kernels allocate on their own (oneDNN layout copies, im2col buffers).
"""
from __future__ import annotations

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

from models import size_multiple, tile_size
from utils.errors import UserError
from utils.eval.precision import default_tile_batch
from utils.host import available_memory as host_available_memory
from utils.host import proc_kib
from utils.tiling import fewest_pixels_tile


class ImageOverBudgetError(UserError):
    """One image that cannot be restored under ``--max_memory`` (its buffers, or its smallest tile, do not
    fit): ``test_model.py`` lists it with the unreadable images and derains the others."""

logger = logging.getLogger("coic.memory")

__all__ = ["parse_size", "format_size", "available_memory", "current_usage", "default_budget",
           "LiveTensorBytes", "forward_peak_bytes", "measured_peak", "TilePlan", "MemoryPlanner"]

MiB, GiB = 2 ** 20, 2 ** 30
DEFAULT_SHARE = {"cpu": 0.6, "cuda": 0.85}  # of the memory available when the run starts
KERNEL_FACTOR = 2.5  # real / counted tensor bytes: above what kernels were seen to add, to stay on the safe side
MARGIN = 1.15        # on top of every measured activation
RESERVE = 64 * MiB   # heap growth between images
# Bytes per image pixel besides the model's activations. CPU: the float input, the next image
# being decoded, a padded copy, the blended output and its weights, up to two outputs waiting to
# be written; scoring adds the clean image and float64 metric maps (PSNR/SSIM) or NIQE's float64
# maps of the full output (about 90 B per pixel). GPU: the input, a padded copy, the output and
# weights.
IMAGE_BYTES_PER_PIXEL = {"cpu": 100, "cuda": 40}
SCORING_BYTES_PER_PIXEL = 130
MAX_TILE_BATCH = 16
PROBE_SIDES = (64, 192)


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


def available_memory(device: torch.device) -> int:
    """Bytes the run could still take: free GPU memory, or what the host can still give
    (``utils.host.available_memory``: MemAvailable, or less under a cgroup limit; 0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_memory() or 0


def current_usage(device: torch.device) -> int:
    """Bytes the run holds now: allocated GPU tensors, or this process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = proc_kib("/proc/self/status", "VmRSS")
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


def forward_peak_bytes(model: nn.Module, x: Tensor, z: Optional[Tensor] = None) -> int:
    """Peak bytes of the tensors one forward ``model(x, z)`` creates (inputs and weights not counted).

    x (B,3,H,W); z (1,dim) or None, expanded to the batch. Runs under ``inference_mode``.
    """
    code = None if z is None else z.expand(x.shape[0], -1)
    with torch.inference_mode(), LiveTensorBytes() as counter:
        model(x, code)
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
    base = proc_kib("/proc/self/status", "VmRSS")
    fn()
    peak = proc_kib("/proc/self/status", "VmHWM")
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
        self.multiple = size_multiple(model)
        self.own_tile = tile_size(model)
        # modulated -> (a, b, exact): peak bytes of one forward = a + b * pixels; exact: from two sizes
        self.line: dict[bool, tuple[float, float, bool]] = {}
        self.shrink = 1.0  # lowered after an out-of-memory error
        self._announced: Optional[tuple] = None

    def announce(self, plan: "TilePlan", h: int, w: int) -> None:
        """Log the plan when it differs from the previous image's."""
        if (plan.tile, plan.batch) != self._announced:
            self._announced = (plan.tile, plan.batch)
            logger.info("%dx%d image: %s, within --max_memory %s", w, h, plan.describe(), format_size(self.budget))

    # ---------------------------------------------------------------- measuring
    def _probe(self, side: int, z: Optional[Tensor], batch: int = 1) -> int:
        """Peak bytes one forward of a (batch,3,side,side) input adds, after an untimed warm-up."""
        x = torch.rand(batch, 3, side, side, device=self.device).contiguous(memory_format=self.memory_format)
        code = None if z is None else z.expand(batch, -1)

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                                                        enabled=self.amp is not None):
                self.model(x, code)

        forward()  # one-time costs of a first call at this size (kernel caches) are not the model's
        real = measured_peak(forward, self.device)
        if real is None:  # no peak to read here: count the tensors instead
            with LiveTensorBytes() as counter:
                forward()
            real = int(KERNEL_FACTOR * counter.peak)
        return real

    def _line(self, z: Optional[Tensor], room: Optional[float] = None) -> tuple[float, float, bool]:
        """The line of this mode; refined by a second probe when ``room`` is given (a tight plan)."""
        key = z is not None
        if key not in self.line:
            if self.own_tile is not None:  # pixels = tiles: one tile, and two on a GPU that batches them
                one = self._probe(self.own_tile, z)
                two = self._probe(self.own_tile, z, 2) if default_tile_batch(self.device) > 1 else None
                slope = one if two is None else max(two - one, 0)
                px = self.own_tile ** 2
                self.line[key] = (one - slope, slope / px, True)
            else:
                side = max(self.multiple, PROBE_SIDES[0] // self.multiple * self.multiple)
                self.line[key] = (0.0, self._probe(side, z) / side ** 2, False)
        a, b, exact = self.line[key]
        if not exact and room is not None:
            first = max(self.multiple, PROBE_SIDES[0] // self.multiple * self.multiple)
            # the second size: PROBE_SIDES[1], or less if that might not fit the room
            fits = int(math.sqrt(max(room, 0) / (MARGIN * b)))
            side = min(PROBE_SIDES[1], fits) // self.multiple * self.multiple
            if side >= 2 * first:
                small, large = b * first ** 2, self._probe(side, z)
                b = max(large - small, 0) / (side ** 2 - first ** 2)
                a = max(small - b * first ** 2, 0.0)
                self.line[key] = (a, b, True)
        return self.line[key]

    def activations(self, h: int, w: int, z: Optional[Tensor], batch: int = 1) -> float:
        """Estimated bytes one forward of ``batch`` (h, w) inputs adds to what is held."""
        a, b, _ = self._line(z)
        return MARGIN * (a + b * h * w * batch)

    def _room(self, h: int, w: int, scored: bool) -> tuple[int, float]:
        per_pixel = IMAGE_BYTES_PER_PIXEL.get(self.device.type, IMAGE_BYTES_PER_PIXEL["cpu"])
        if scored and self.device.type != "cuda":
            per_pixel += SCORING_BYTES_PER_PIXEL
        fixed = current_usage(self.device) + per_pixel * h * w + RESERVE
        room = self.budget * self.shrink - fixed
        if room <= 0:
            raise ImageOverBudgetError(f"--max_memory {format_size(self.budget)} is less than the run already holds plus a "
                            f"{w}x{h} image ({format_size(fixed)}); raise --max_memory")
        return fixed, room

    # ---------------------------------------------------------------- the plan
    def plan(self, h: int, w: int, z: Optional[Tensor] = None, scored: bool = False) -> TilePlan:
        """The plan for an (h, w) image (z: its code, or None for plain restoration)."""
        name = type(self.model).__name__
        _, room = self._room(h, w, scored)
        ph, pw = (math.ceil(s / self.multiple) * self.multiple for s in (h, w))
        if self.own_tile is None and self.activations(ph, pw, z) > room:
            self._line(z, room)  # tight: measure the line instead of bounding it
        # What the process holds is read after the probes, which take memory of their own.
        fixed, room = self._room(h, w, scored)
        if self.own_tile is not None:
            most = MAX_TILE_BATCH if default_tile_batch(self.device) > 1 else 1
            fitting = [b for b in range(1, most + 1) if self.activations(self.own_tile, self.own_tile, z, b) <= room]
            if not fitting:
                need = fixed + self.activations(self.own_tile, self.own_tile, z)
                raise ImageOverBudgetError(f"--max_memory {format_size(self.budget)} is too small for {name}: one "
                                f"{self.own_tile}x{self.own_tile} tile needs about {format_size(need)}")
            batch = fitting[-1]
            return TilePlan(self.own_tile, batch, int(fixed + self.activations(self.own_tile, self.own_tile, z, batch)))
        whole = self.activations(ph, pw, z)
        if whole <= room:
            return TilePlan(None, 1, int(fixed + whole))
        a, b, _ = self._line(z)
        smallest = math.ceil(max(2 * self.overlap + self.multiple, 64) / self.multiple) * self.multiple
        side = int(math.sqrt(max(room / MARGIN - a, 0) / b)) // self.multiple * self.multiple if b > 0 else max(ph, pw)
        side = min(side, max(ph, pw))
        if side < smallest:
            need = fixed + self.activations(smallest, smallest, z)
            raise ImageOverBudgetError(f"--max_memory {format_size(self.budget)} is too small for {name} on a {w}x{h} image: "
                            f"a {smallest}x{smallest} tile needs about {format_size(need)}")
        # The largest tile that fits sets the number of forwards; the smallest tile that needs no more of
        # them computes the fewest pixels (on a CPU the time goes with the pixels computed).
        side = fewest_pixels_tile(h, w, side, self.overlap, self.multiple, smallest)
        return TilePlan(side, 1, int(fixed + self.activations(side, side, z)))

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
