"""What the host can still give this process: one cgroup-aware answer for every caller (the image
cache of ``datasets.py`` and the tile planner of ``utils/eval/memory.py``)."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["available_memory", "proc_kib"]


def proc_kib(path: str, field: str) -> Optional[int]:
    """The KiB value of ``field`` in a /proc file such as /proc/meminfo (None when absent or unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes of memory the host can still give: ``MemAvailable``, or less under a cgroup v2 limit
    (``memory.max`` − ``memory.current``); free pages where /proc is missing; None if unknown."""
    kib = proc_kib(os.path.join(proc, "meminfo"), "MemAvailable")
    available = None if kib is None else kib * 1024
    if available is None:
        try:  # free pages only: stricter than MemAvailable, which counts reclaimable caches too
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:  # a container's limit can be far below what the host reports
        with open(os.path.join(cgroup, "memory.max")) as f:
            limit = f.read().strip()
        if limit != "max":
            with open(os.path.join(cgroup, "memory.current")) as f:
                room = int(limit) - int(f.read())
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available
