"""One atomic save and one load that understands every checkpoint layout we accept.

Accepted by ``load_weights``:
- this project's training checkpoints (``{"model": ..., "encoder": ..., ...}``),
- plain state_dicts in our parameter names,
- state_dicts saved by the published CoIC code (``*.base_conv.conv.*``, ``*.g2pa_wgen.*``,
  ``module.`` prefixes from DataParallel, MoCo ``encoder_q.*``/``encoder_k.*``),
- a backbone's original (pre-CoIC) layout, when the backbone defines ``remap_legacy_keys``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from typing import Any, Collection, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from utils.errors import UserError, is_user_facing, one_line
from utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_weights", "remap_published_keys", "save_atomic",
           "read_checkpoint", "trusted_checkpoints"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding objects the safe loader refuses (they could run code when unpickled)."""


# Published CoI-M layers wrap the plain conv twice (TConv.base_conv.conv) and call the
# modulation MLP ``g2pa_wgen``; ours are the conv itself with a ``generator``.
_PUBLISHED_RENAMES = (
    (re.compile(r"\.base_conv\.conv\."), "."),
    (re.compile(r"^base_conv\.conv\."), ""),
    (re.compile(r"(^|\.)g2pa_wgen\."), r"\1generator."),
)


def remap_published_keys(state: Mapping[str, Any]) -> dict:
    """Rename published CoIC parameter names (and ``module.`` prefixes) to ours."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        for pattern, repl in _PUBLISHED_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


# Besides tensors and plain containers, checkpoints written before the NumPy random state was stored
# as a tensor hold one NumPy array (``np.random.get_state()``). These are exactly the classes that
# array needs; nothing callable beyond NumPy's array rebuild is admitted.
def _numpy_array_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_trust_all = False


@contextlib.contextmanager
def trusted_checkpoints(trust: bool) -> Iterator[None]:
    """``--trust_checkpoint`` of a command: inside, ``read_checkpoint`` loads files with the full
    (code-running) unpickler when ``trust``. Never the default; each such load warns, naming the file.
    """
    global _trust_all
    before, _trust_all = _trust_all, bool(trust)
    try:
        yield
    finally:
        _trust_all = before


def read_checkpoint(path: Union[str, os.PathLike], trust: Optional[bool] = None) -> Any:
    """``torch.load`` on CPU with the safe unpickler and a one-line error for missing, unreadable and
    unsafe files.

    A ``.pth`` file is a pickle: loading it with the full unpickler can run any code it names. Only
    tensors, numbers, strings and containers (plus NumPy arrays, for checkpoints of earlier versions)
    are read; a file holding anything else raises ``UnsafeCheckpointError`` unless ``trust`` (default:
    ``trusted_checkpoints``) is set, which loads it with the full unpickler and a warning.
    """
    path = os.fspath(path)
    trust = _trust_all if trust is None else trust
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if trust:
        logger.warning("--trust_checkpoint: loading %s with the full unpickler, which runs any code the file "
                       "names; do this only for files from a source you trust", path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)  # the opt-out, never the default
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise UnsafeCheckpointError(
                f"{path} holds objects beyond tensors ({_unsafe_names(path)}), which can run code when loaded; "
                "it was not loaded. Load it only if you trust its source: pass --trust_checkpoint") from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise _unreadable(path, exc) from None


def _unreadable(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {one_line(exc)[:200]}); "
                           "the file is truncated or not a PyTorch checkpoint")


def _unsafe_names(path: str) -> str:
    """The classes and functions a checkpoint names beyond what the safe loader admits (read, not run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an unusual container: the refusal itself is what matters
        return "unknown objects"
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_array_globals()}
    names = [n for n in names if n not in allowed] or names
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _extract_state(obj: Any, part: str) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state_dict, got {type(obj).__name__}")
    if part in obj and isinstance(obj[part], Mapping):
        return obj[part]
    for key in ("state_dict", "params", "params_ema"):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def load_weights(module: nn.Module, source: Union[str, os.PathLike, Mapping[str, Any]],
                 part: str = "model", strict: bool = True, may_miss: Collection[str] = (),
                 trust: Optional[bool] = None) -> nn.Module:
    """Load ``source`` (a path or a state_dict, in any accepted layout) into ``module``.

    ``part`` picks the sub-dict of one of our training checkpoints ("model" or "encoder").
    ``may_miss``: keys of ``module`` that ``source`` may lack (they keep their values).
    ``trust``: as for ``read_checkpoint``.
    Raises ``CheckpointError`` naming the missing and unexpected keys on a mismatch.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    obj = read_checkpoint(source, trust) if isinstance(source, (str, os.PathLike)) else source
    state = remap_published_keys(_extract_state(obj, part))
    remap = getattr(module, "remap_legacy_keys", None)
    if callable(remap):
        state = remap(state)
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in may_miss]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{name} does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected keys "
            f"{_preview(unexpected)}; is it a checkpoint of another backbone or hyper-parameter setting?")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"{name} does not fit {type(module).__name__}: shape mismatch "
                              f"{_preview(shapes)}; was it trained with other hyper-parameters?")
    module.load_state_dict(state, strict=strict and all(k in state for k in own))
    return module


def _preview(keys: list, n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


class _WriteRecorder:
    """A file that remembers the OS error of a failed write: torch's zip writer reports one in a
    message of its own (``unexpected pos ...``, ``file write failed``), or not at all."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self.error: Optional[OSError] = None

    def _recorded(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def write(self, data) -> int:
        return self._recorded(self._file.write, data)

    def flush(self) -> None:
        self._recorded(self._file.flush)

    def __enter__(self) -> "_WriteRecorder":
        return self

    def __exit__(self, *exc_info) -> None:
        self._recorded(self._file.close)


def save_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it into place.

    A write the system refuses (a full disk, a quota, the file size limit, a read-only folder)
    raises ``CheckpointError``: one line naming the file and what to do, whatever torch's writer
    said. The previous checkpoints stay and no temporary file is left. Any other error (a bug in
    what is saved) keeps its traceback.
    """
    path = os.fspath(path)
    recorder: list[_WriteRecorder] = []

    def write(tmp: str) -> None:
        f = _WriteRecorder(tmp)
        recorder.append(f)
        with f:
            torch.save(obj, f)

    try:
        atomic_write(path, write, fsync=True)
    except (OSError, RuntimeError) as exc:
        refused = recorder[0].error if recorder else None  # the OS refused a write, whatever torch says
        if refused is None and not (isinstance(exc, OSError) and is_user_facing(exc)):
            raise
        failed = refused or exc
        reason = getattr(failed, "strerror", None) or one_line(failed)
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); free disk space (or quota, or raise "
                              "the file size limit: ulimit -f) or pick another --save_path") from exc
