"""One atomic save and one load that understands every checkpoint layout we accept.

Accepted by ``load_weights``:
- this project's training checkpoints (``{"model": ..., "encoder": ..., ...}``),
- plain state_dicts in our parameter names,
- state_dicts saved by the published CoIC code (``*.base_conv.conv.*``, ``*.g2pa_wgen.*``,
  ``module.`` prefixes from DataParallel, MoCo ``encoder_q.*``/``encoder_k.*``),
- a backbone's original (pre-CoIC) layout, when the backbone defines ``remap_legacy_keys``.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Collection, Mapping, Union

import torch
import torch.nn as nn

from utils.errors import UserError, is_user_facing, one_line
from utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load_weights", "remap_published_keys", "save_atomic", "read_checkpoint"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


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


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """``torch.load`` on CPU with a one-line error for missing or unreadable files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); "
                              "the file is truncated or not a PyTorch checkpoint") from None


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
                 part: str = "model", strict: bool = True, may_miss: Collection[str] = ()) -> nn.Module:
    """Load ``source`` (a path or a state_dict, in any accepted layout) into ``module``.

    ``part`` picks the sub-dict of one of our training checkpoints ("model" or "encoder").
    ``may_miss``: keys of ``module`` that ``source`` may lack (they keep their values).
    Raises ``CheckpointError`` naming the missing and unexpected keys on a mismatch.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
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


def save_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it into place.

    A write that fails for lack of space or permission raises ``CheckpointError`` (one line,
    what to do); the previous checkpoints stay and no temporary file is left.
    """
    path = os.fspath(path)
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)
    except OSError as exc:
        if not is_user_facing(exc):
            raise
        raise CheckpointError(f"cannot write checkpoint {path} ({exc.strerror or exc}); "
                              "free some disk space or pick another --save_path") from exc
    except RuntimeError as exc:
        # torch's zip writer reports a failed write (a full disk) as a RuntimeError of its own.
        if "write" not in str(exc).lower():
            raise
        raise CheckpointError(f"cannot write checkpoint {path} ({one_line(exc)}); "
                              "free some disk space or pick another --save_path") from exc
