"""Thin helpers over ``torch.distributed`` for torchrun launches (no-ops in a single process)."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from utils.errors import UserError

logger = logging.getLogger("coic")


def resolve_device(args: argparse.Namespace, local_rank: Optional[int] = None) -> torch.device:
    """The one device rule of every command: ``cuda:<gpu_id>`` with ``--use_GPU`` (``cuda:<local_rank>``
    under torchrun), else the CPU, also where CUDA is present (``utils.cli.add_device_args`` adds the
    flags). ``UserError`` when ``--use_GPU`` is given and CUDA is not there."""
    if getattr(args, "use_GPU", False):
        if not torch.cuda.is_available():
            raise UserError("--use_GPU was given but CUDA is not available; drop the flag to run on the CPU")
        return torch.device(f"cuda:{local_rank if local_rank is not None else int(args.gpu_id)}")
    if torch.cuda.is_available():
        logger.warning("CUDA is available but not used; pass --use_GPU to run on the GPU")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks along dim 0, in rank order."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
