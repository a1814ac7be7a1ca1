"""Keep memory that PyTorch frees inside the process, so the next tensor reuses its pages.

PyTorch allocates CPU tensors with ``malloc``. glibc serves a request above its mmap threshold
(dynamic, never above 32 MiB on 64-bit) with a fresh ``mmap`` and gives it back with ``munmap``
on ``free``, so every large activation of a forward is mapped, zero-filled by the kernel one 4 KiB
page fault at a time, and unmapped again: a BRN forward at 512x512 (activations of 32-128 MiB)
spends over a third of its CPU time in the kernel that way (docs/speed.md).

``keep_freed_memory()`` raises the mmap threshold and turns trimming off with ``mallopt`` once at
start-up: large blocks then come from the heap, and a freed block stays there for the next
allocation. Trimming is off rather than at a high threshold because a large photo's working set
exceeds any threshold an ``int`` can hold: with any threshold, a large forward gives its top back
after each forward and faults it in again (millions of page faults); never trimmed, the next
forward faults almost nothing.
The cost is resident memory: what a peak needed is not given back to the system until the process
exits (``benchmarks/page_faults.py`` measures both). A process that is forked afterwards (DataLoader
workers under the default ``fork`` start method) inherits the setting; one that is spawned starts
with glibc's defaults unless it calls this function itself.

Each parameter that the user set already (``MALLOC_MMAP_THRESHOLD_=131072`` and the like, or
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``) is left alone, so that is also the way to
opt out. On a C library other than glibc (musl, macOS, Windows) nothing is done.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Optional

__all__ = ["keep_freed_memory", "KEPT_PARAMETERS"]

logger = logging.getLogger("coic.allocator")

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# The largest value mallopt takes (its argument is an int). Requests below it come from the heap;
# glibc 2.26 and later accept thresholds above its 32 MiB dynamic cap from mallopt. A request above
# it (2 GiB and more) is still mapped: its page faults are few next to the work on such a tensor.
_LARGE = 2 ** 31 - 1

# parameter -> (mallopt number, value, environment variable, GLIBC_TUNABLES name) that overrides it.
# A trim threshold of -1 is glibc's "never trim" (mallopt(3)).
NEVER = -1
KEPT_PARAMETERS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, _LARGE, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    "trim_threshold": (M_TRIM_THRESHOLD, NEVER, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
}

_applied: Optional[dict[str, int]] = None  # what the first call set, for later calls (idempotent)


def _glibc() -> Optional[ctypes.CDLL]:
    """The running process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # The parameter numbers below are glibc's: another C library's mallopt may read them otherwise.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _set_by_user(env_name: str, tunable: str, environ) -> bool:
    if env_name in environ:
        return True
    # GLIBC_TUNABLES="glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=..."
    return any(item.split("=", 1)[0] == tunable for item in environ.get("GLIBC_TUNABLES", "").split(":"))


def keep_freed_memory(environ=None) -> dict[str, int]:
    """Make glibc keep freed blocks for reuse instead of unmapping them (see the module docstring).

    Call once at start-up, before the first large tensor. Returns the parameters set, by name
    (``{}`` on a non-glibc platform or when the user set them all); later calls return the same
    without touching the allocator again. ``environ`` (default ``os.environ``) is where the
    user's own settings are looked up.
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    environ = os.environ if environ is None else environ
    libc = _glibc()
    if libc is None:
        logger.debug("allocator: not glibc (%s), malloc left as it is", sys.platform)
        _applied = {}
        return {}
    applied = {}
    for name, (param, value, env_name, tunable) in KEPT_PARAMETERS.items():
        if _set_by_user(env_name, tunable, environ):
            logger.debug("allocator: %s left to the user's %s", name, env_name if env_name in environ else tunable)
        elif libc.mallopt(param, value) == 1:
            applied[name] = value
        else:
            logger.debug("allocator: glibc refused %s=%d", name, value)
    logger.debug("allocator: freed memory is kept for reuse: %s", applied or "nothing set")
    _applied = applied
    return dict(applied)
