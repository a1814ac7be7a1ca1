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


def add_device_args(p, verb: str = "run") -> None:
    """``--use_GPU``, ``--gpu_id``, ``--device``: the flags ``resolve_device`` reads (``p``: a parser or group)."""
    p.add_argument("--use_GPU", action="store_true", help=f"{verb} on CUDA (device cuda:<gpu_id>)")
    p.add_argument("--gpu_id", default="0", help="CUDA device index used with --use_GPU")
    p.add_argument("--device", default=None, help="explicit torch device (cpu, cuda, cuda:1); overrides --use_GPU")


def resolve_device(args: argparse.Namespace, local_rank: Optional[int] = None,
                   prefer_cuda: bool = False) -> torch.device:
    """The one device choice of every command: ``--device`` if given, else ``cuda:<gpu_id>`` with
    ``--use_GPU`` (``cuda:<local_rank>`` under torchrun), else the CPU; with ``prefer_cuda``
    (tools without ``--use_GPU``) CUDA whenever it is available. ``UserError`` for a device that
    is not one or is not there."""
    name = getattr(args, "device", None)
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise UserError(f"--device {name!r} is not a torch device ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name} was given but CUDA is not available; use --device cpu")
        return device
    if getattr(args, "use_GPU", False):
        if not torch.cuda.is_available():
            raise UserError("--use_GPU was given but CUDA is not available; drop the flag to run on the CPU")
        return torch.device(f"cuda:{local_rank if local_rank is not None else int(args.gpu_id)}")
    if torch.cuda.is_available():
        if prefer_cuda:
            return torch.device("cuda")
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
