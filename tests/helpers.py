"""What tests share besides fixtures: paths, tiny training runs, reproducible codes, scrambled CoIC weights.

A plain module (``from helpers import ...``): pytest puts ``tests/`` on ``sys.path`` for the files in it.
Fixtures and hooks live in ``conftest.py``; the backbone contract checks in ``contract.py``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
REFERENCE_SKIP = "published reference folder absent"

# What the suite sees as the host's CPU ($COIC_CPU_FLAGS, set in conftest.py): no native bf16, so no
# test depends on the machine. Tests of the other answer set NATIVE_BF16_FLAGS themselves.
NO_NATIVE_BF16_FLAGS = "fpu sse2 avx avx2 fma"
NATIVE_BF16_FLAGS = NO_NATIVE_BF16_FLAGS + " avx512f avx512_bf16"


def reference_file(name: str) -> str:
    """Path of a published reference file.

    Skips the test only when the whole folder is absent (a clean checkout without
    ``../shared``); a folder that is there but lacks the file is a failure, not a skip.
    """
    if not os.path.isdir(REFERENCE):
        pytest.skip(f"{REFERENCE_SKIP}: {os.path.normpath(REFERENCE)}")
    path = os.path.join(REFERENCE, name)
    if not os.path.isfile(path):
        pytest.fail(f"{name} is missing from {os.path.normpath(REFERENCE)} (its README lists the files)")
    return path


def train_flags(save_path: str, data_paths: str, **overrides) -> list[str]:
    """Tiny but complete training flags (every code path, seconds on a CPU): the recipe's ``--tiny``
    model, batch and crop, and a short run; ``overrides`` are typed flags and win over ``--tiny``."""
    flags = dict(data_paths=data_paths, save_path=save_path, tot_iters=6, stage1_iters=3, num_workers=0,
                 save_freq=2, log_freq=1, image_freq=3, n_neg=2)
    flags.update(overrides)
    return ["--tiny"] + [item for k, v in flags.items() for item in (f"--{k}", str(v))]


def make_trainer(save_path: str | os.PathLike, data: str | Sequence[str], model: str = "BRN",
                 extra: Sequence[str] = (), *, recipe_changes: dict | None = None, **flags):
    """A Trainer for ``train_<model>.py`` with ``train_flags(save_path, data, **flags)`` then ``extra``
    (untyped flags such as ``["--amp", "bf16"]``); ``data`` is one folder or a list of them;
    ``recipe_changes`` replace fields of the parsed recipe before the Trainer is built."""
    from utils.train.config import parse_train_args
    from utils.train.trainer import Trainer

    data_paths = data if isinstance(data, str) else ",".join(data)
    args = parse_train_args(model, train_flags(str(save_path), data_paths, **flags) + list(extra))
    if recipe_changes:
        args.recipe = args.recipe.replace(**recipe_changes)
    return Trainer(args)


def unit_codes(batch: int, dim: int, seed: int) -> torch.Tensor:
    """(batch, dim) unit vectors, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)


def coic_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What z switches on: CoI-M generators and context embeddings (found by type)."""
    from models.coim import context_embedding_parameters, modulation_parameters

    return modulation_parameters(model) + context_embedding_parameters(model)


def scramble_coic(model: nn.Module, std: float = 0.5) -> None:
    """Give every CoIC parameter large random weights (the default init is near-neutral)."""
    with torch.no_grad():
        for p in coic_parameters(model):
            p.normal_(0.0, std)
