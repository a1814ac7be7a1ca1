"""The one atomic write: build the file beside its target, rename it into place when complete.

An interrupted or failed write (a full disk, Ctrl-C) leaves the previous file, or none, and no
temporary file behind.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from typing import Callable, Iterator, Union

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "atomic_dir"]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same extension); it replaces ``path`` when the block succeeds.

    ``fsync``: flush the file to disk before the rename (checkpoints), so a crash right after
    cannot leave a renamed but empty file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    # The writer creates the file itself, so it gets the usual permissions (mkstemp's are 0600).
    tmp = os.path.join(folder, f".{root}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: PathLike, writer: Callable[[str], object], fsync: bool = False) -> None:
    """``writer(tmp_path)`` writes the file; it then replaces ``path`` in one rename."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (newlines as given)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` when the block succeeds."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
