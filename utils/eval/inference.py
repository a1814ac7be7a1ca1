"""Restoring whole images with any backbone: z once per image, padding, tiling."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from models import size_multiple, tile_size
from utils.errors import UserError
from utils.eval.precision import default_tile_batch
from utils.images import resize_square
from utils.tiling import pad_to_multiple, tiled_apply

# --amp choices of training and evaluation: the autocast dtype (None: float32).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODER_SIZE = 128  # z is computed from the whole image resized to 128 x 128, as the reference test


@torch.inference_mode()
def image_code(encoder: nn.Module, x: Tensor) -> Tensor:
    """z (1,dim) of x (1,3,H,W) in [0,1] from the key encoder, on the image resized to 128 x 128."""
    return encoder(resize_square(x, ENCODER_SIZE))


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``model`` compiled by TorchInductor for inference (``test_model.py --compile``).

    The weights are frozen into the graph (``freezing``: each convolution's weight is prepacked
    once and fused with the activation that follows), and shapes are static: one graph per input
    size, built on the first forward at that size (about 20 s for BRN on a 2-core CPU, minutes for
    DRSformer) and kept for every later image or tile of that size in the process; inductor's
    on-disk cache shortens the build in later processes. The returned module forwards attribute
    reads to ``model``. On a CPU inductor builds C++, so a machine without a C++ compiler gets a
    one-line error here.
    """
    if next(model.parameters()).device.type == "cpu" and _cpp_compiler() is None:
        raise UserError("--compile needs a C++ compiler on a CPU (TorchInductor builds C++; it looks for $CXX, "
                        "g++ or clang++): install one (e.g. apt-get install g++) or drop --compile")
    return torch.compile(model, dynamic=False, options={"freezing": True})


def _cpp_compiler() -> Optional[str]:
    """The path of the C++ compiler TorchInductor would use on a CPU, None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        command = get_cpp_compiler()
    except Exception:  # a private API that may move or raise when no compiler is found
        command = os.environ.get("CXX") or "g++"
    return shutil.which(command.split()[0]) if command else None


def effective_tile(model: nn.Module, tile: Optional[int]) -> Optional[int]:
    """The tile size to use: the user's, else the backbone's own (IDT), else none."""
    own = tile_size(model)
    multiple = size_multiple(model)
    if tile is not None and tile > 0:
        if tile % multiple:
            raise UserError(f"--tile {tile} is not a multiple of {type(model).__name__}'s size multiple {multiple}")
        if own is not None and tile != own:
            raise UserError(f"--tile must be {own} for {type(model).__name__} (it works at its training size)")
        return tile
    return own


@torch.inference_mode()
def restore(model: nn.Module, x: Tensor, z: Optional[Tensor] = None, tile: Optional[int] = None,
            overlap: int = 32, tile_batch: Optional[int] = None, planner=None, scored: bool = False,
            progress: bool = False) -> Tensor:
    """Derain x (1,3,H,W) in [0,1]; returns (1,3,H,W) clamped to [0,1].

    The image is padded to the backbone's ``size_multiple``; when it is larger than ``tile``
    (or the backbone has a fixed ``tile_size``) it is processed in overlapping tiles,
    ``tile_batch`` per forward (default: one on a CPU, four on a GPU).

    ``planner`` (a ``utils.eval.memory.MemoryPlanner``, used when ``tile`` is None) chooses the tiles
    and batch for x (``scored``: the output will be scored too, against ground truth or by NIQE). Running out of GPU memory then
    retries with half the tile batch, then tiles of half the side, and makes the planner's later
    plans smaller; at the smallest tile the error becomes a ``UserError`` saying what to do.
    ``progress``: a bar of the tiles while an image of many tiles is restored.
    """
    if planner is None or tile is not None:
        return _restore(model, x, z, tile, overlap, tile_batch, progress)
    h, w = x.shape[-2:]
    plan = planner.plan(h, w, z, scored)
    planner.announce(plan, h, w)
    while True:
        try:
            return _restore(model, x, z, plan.tile, overlap, plan.batch, progress)
        except torch.OutOfMemoryError:
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = planner.smaller(plan, h, w)
            if smaller is None:
                raise UserError(f"out of {x.device.type.upper()} memory even with {plan.describe()}; lower "
                                "--max_memory, free the device, or run on the CPU") from None
            planner.shrink *= 0.8
            logging.getLogger("coic.memory").warning("out of memory with %s; retrying with %s", plan.describe(),
                                                     smaller.describe())
            plan = smaller


def _restore(model: nn.Module, x: Tensor, z: Optional[Tensor], tile: Optional[int], overlap: int,
             tile_batch: Optional[int], progress: bool = False) -> Tensor:
    multiple = size_multiple(model)
    tile = effective_tile(model, tile)
    if tile_batch is None:
        tile_batch = default_tile_batch(x.device)

    def run(t: Tensor) -> Tensor:
        zz = None if z is None else z.expand(t.shape[0], -1)
        return model(t, zz)

    h, w = x.shape[-2:]
    if tile is not None and (max(h, w) > tile or tile_size(model) is not None):
        y = tiled_apply(run, x, tile, overlap=overlap, batch=tile_batch, progress=progress)
    else:
        y = run(pad_to_multiple(x, multiple))[..., :h, :w]
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return y.clamp(0, 1)  # a backbone that hands back its input: never overwrite the caller's image
    return y.clamp_(0, 1)
