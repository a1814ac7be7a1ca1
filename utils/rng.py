"""The random streams a run depends on: seeding them and saving/restoring them in checkpoints."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict:
    """The global streams and ``generator`` (the exemplars'), as stored in a checkpoint."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensor(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (CUDA streams only where CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_stored(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


# NumPy's state is ("MT19937", uint32 keys, pos, has_gauss, cached_gaussian). Checkpoints store the
# keys as an int64 tensor, which the safe loader reads without admitting NumPy classes; checkpoints
# of earlier versions hold the array itself and restore as before.
def _numpy_state_as_tensor(state: tuple) -> tuple:
    name, keys, *rest = state
    return (name, torch.from_numpy(keys.astype(np.int64)), *rest)


def _numpy_state_from_stored(state: tuple) -> tuple:
    name, keys, *rest = state
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    return (name, keys, *rest)
