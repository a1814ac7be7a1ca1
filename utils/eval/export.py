"""ONNX export: one graph from the rainy image to the derained one, as ``utils.eval.inference`` restores it.

The graph takes ``rain`` (1,3,H,W) float32 in [0,1], any H and W, and returns the derained
image (1,3,H,W) in [0,1]. For a CoIC checkpoint it holds the encoder too: z is computed
inside, from the image resized to 128 x 128 with the antialiased bilinear filter of
``image_code`` (ONNX ``Resize`` with ``antialias=1``, opset 18). Inside, the image is padded
to the backbone's ``size_multiple`` the way ``utils.tiling.pad_to`` pads (reflect where
possible, else replicate), or, for a backbone with a ``tile_size`` (IDT), cut into the
overlapping tiles of ``utils.tiling.tiled_apply`` and blended with its weights; a loop over
the tiles (``scan``, an ONNX ``Loop``) runs the backbone at batch 1, where CoI-M is one
convolution whose kernel the graph computes. ``export.py`` is the command line.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from models import size_multiple
from utils.errors import UserError
from utils.eval.inference import ENCODER_SIZE, effective_tile
from utils.images import resize_square
from utils.io import atomic_path
from utils.tiling import blend_weights

__all__ = ["DEFAULT_OPSET", "DEFAULT_OVERLAP", "RestoreGraph", "pad_by_index", "tile_starts", "example_size", "check_writable",
           "load_for_export", "export_onnx"]

DEFAULT_OPSET = 18  # the first opset whose Resize has ``antialias`` (the encoder's 128 x 128 view)
DEFAULT_OVERLAP = 32  # restore()'s default tile overlap


def _shape_scalar(n: int) -> Tensor:
    """A symbolic image size as a 0-d int64 tensor: comparisons on it stay in the graph (no guard)."""
    return torch.scalar_tensor(n, dtype=torch.long)


def pad_by_index(x: Tensor, height: int, width: int) -> Tensor:
    """``utils.tiling.pad_to`` as a gather: x (1,C,h,w) -> (1,C,height,width), padded at the bottom/right.

    Reflect when both pads are smaller than the image side, else replicate, as ``pad_to``; the
    choice is a ``where`` on index tensors, so one graph serves every size. A gather copies
    values, so the result equals ``pad_to``'s bit for bit.
    """
    h, w = _shape_scalar(x.shape[-2]), _shape_scalar(x.shape[-1])
    rows, cols = torch.arange(height), torch.arange(width)
    reflect = (height - h < h) & (width - w < w)

    def index(i: Tensor, n: Tensor) -> Tensor:
        mirrored = torch.where(i < n, i, 2 * (n - 1) - i)
        return torch.where(reflect, mirrored, i.clamp(max=n - 1))

    return x.index_select(2, index(rows, h)).index_select(3, index(cols, w))


def tile_starts(length: int, tile: int, stride: int) -> Tensor:
    """(n,) int64 starts of ``utils.tiling.tile_boxes`` along a side of ``length`` >= ``tile``:
    every ``stride``, the last one flush with the end."""
    count = (length - tile + stride - 1) // stride + 1
    return (torch.arange(count) * stride).clamp(max=length - tile)


class RestoreGraph(nn.Module):
    """``restore(model, rain, image_code(encoder, rain))`` as one exportable module.

    forward(rain): rain (1,3,H,W) in [0,1] -> derained (1,3,H,W) in [0,1]. ``encoder=None``: the
    plain backbone (z=None). ``overlap``: of the tiles, for a backbone with a ``tile_size``.
    """

    def __init__(self, model: nn.Module, encoder: Optional[nn.Module] = None, overlap: int = DEFAULT_OVERLAP):
        super().__init__()
        self.model, self.encoder, self.overlap = model, encoder, overlap
        self.tile = effective_tile(model, None)
        if self.tile is not None and not 0 <= overlap < self.tile:
            raise UserError(f"--tile_overlap ({overlap}) must be smaller than the tile ({self.tile})")
        if self.tile is not None:
            self.register_buffer("blend", blend_weights(self.tile), persistent=False)

    def forward(self, rain: Tensor) -> Tensor:
        z = None if self.encoder is None else self.encoder(resize_square(rain, ENCODER_SIZE))
        h, w = rain.shape[-2:]
        if self.tile is None:
            k = size_multiple(self.model)
            padded = pad_by_index(rain, (h + k - 1) // k * k, (w + k - 1) // k * k)
            return self.model(padded, z)[..., :h, :w].clamp(0, 1)
        return self._tiled(rain, z).clamp(0, 1)

    def _tiled(self, rain: Tensor, z: Optional[Tensor]) -> Tensor:
        """``tiled_apply`` at batch 1: one scan step per tile, accumulating into flat (1,C,H*W) maps."""
        from torch._higher_order_ops.scan import scan

        tile, stride = self.tile, self.tile - self.overlap
        h, w = rain.shape[-2:]
        height, width = torch.sym_max(h, tile), torch.sym_max(w, tile)
        padded = pad_by_index(rain, height, width)
        top, left = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
        # Row-major like tile_boxes: the sums meet every pixel's tiles in the order tiled_apply adds them.
        # Indexing, not broadcasting (top[:, None] + left): a broadcast would let the exporter fix the
        # number of tiles of the example image.
        k = torch.arange(top.shape[0] * left.shape[0])
        row = k // left.shape[0]
        boxes = torch.stack([top[row], left[k - row * left.shape[0]]], dim=1)
        offsets = torch.arange(tile)
        weight = self.blend.flatten()

        def step(carry: tuple[Tensor, Tensor], box: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
            out, acc = carry
            rows, cols = box[0] + offsets, box[1] + offsets
            y = self.model(padded.index_select(2, rows).index_select(3, cols), z)
            where = (rows[:, None] * width + cols[None, :]).flatten()
            out = out.index_add(2, where, y.flatten(2) * weight)
            acc = acc.index_add(2, where, weight.expand(1, 1, -1))
            return (out, acc), box[:1].clone()  # scan wants a per-step output; this one is unused

        channels = rain.shape[1]
        start = (rain.new_zeros(1, channels, height * width), rain.new_zeros(1, 1, height * width))
        (out, acc), _ = scan(step, start, boxes)
        return (out / acc).view(1, channels, height, width)[..., :h, :w]


def check_writable(path: str, flag: str = "--save_path") -> None:
    """Raise a one-line ``UserError`` naming ``flag`` when no file can be written at ``path``."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'model.onnx')}")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist (or is not a folder); create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: the folder {folder} is not writable; choose another {flag}")


def load_for_export(spec: str, model_name: Optional[str] = None, load_mode: Optional[str] = None,
                    feat_ext: Optional[str] = None, weights_dir: Optional[str] = None
                    ) -> tuple[nn.Module, Optional[nn.Module], str]:
    """(backbone, encoder or None, load mode) of ``--test_model`` resolved as ``test_model.py`` resolves it.

    A published name or a checkpoint path (``models.pretrained.choose_checkpoint``), loaded by
    ``utils.eval.evaluation``. Without ``load_mode`` a checkpoint file that holds an encoder (or comes
    with ``feat_ext``) is exported with it ("tran"); a published name keeps its own mode.
    """
    from models import available_models
    from models.pretrained import choose_checkpoint
    from utils.eval.evaluation import load_encoder, load_model

    choice = choose_checkpoint(spec, model_name, load_mode)
    if choice.model_name not in available_models():
        raise UserError(f"unknown --model_name {choice.model_name!r}; choose one of: {', '.join(available_models())}")
    model_path, encoder_path = choice.files(feat_ext, weights_dir)
    device = torch.device("cpu")
    model, ckpt = load_model(choice.model_name, model_path, choice.load_mode, device)
    mode = choice.load_mode
    if load_mode is None and choice.published is None:
        has_encoder = isinstance(ckpt, dict) and "encoder" in ckpt
        mode = "tran" if (has_encoder or encoder_path is not None) else "normal"
    encoder = load_encoder(encoder_path, ckpt, model_path, device) if mode == "tran" else None
    return model, encoder, mode


def _solve_translation():
    """An ONNX translation of ``torch.linalg.solve_ex`` (DGUNet's 16 x 16 least squares): ONNX has no
    solve, so Gauss-Jordan elimination with partial pivoting, unrolled over the (static) size."""
    import numpy as np
    import onnx.numpy_helper
    from onnxscript import opset18 as op

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    def solve_ex(a, b, left: bool = True, check_errors: bool = False):
        n = a.shape[-1]
        m = op.Concat(a, b, axis=-1)  # (B, n, n + k): [A | B] becomes [I | A^-1 B]
        row = op.Constant(value=onnx.numpy_helper.from_array(np.arange(n, dtype=np.int64).reshape(1, n, 1)))
        for k in range(n):
            kk = op.Constant(value_int=k)
            column = op.Abs(op.Slice(m, ints(k), ints(k + 1), ints(2)))
            pivot = op.ArgMax(op.Where(op.Less(row, kk), op.Constant(value_float=-1.0), column), axis=1, keepdims=1)
            swap = op.Where(op.Equal(row, kk), pivot, op.Where(op.Equal(row, pivot), kk, row))
            m = op.GatherElements(m, op.Expand(swap, op.Shape(m)), axis=1)
            top = op.Slice(m, ints(k), ints(k + 1), ints(1))
            top = op.Div(top, op.Slice(top, ints(k), ints(k + 1), ints(2)))
            factor = op.Slice(m, ints(k), ints(k + 1), ints(2))
            m = op.Where(op.Equal(row, kk), top, op.Sub(m, op.Mul(factor, top)))
        solution = op.Slice(m, ints(n), ints(2 ** 62), ints(2))
        return solution, a, op.Constant(value_ints=[0]), op.Constant(value_int=0)  # LU, pivots, info: unused

    return {torch.ops.aten._linalg_solve_ex.default: solve_ex}


def example_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the example image to trace with: a few pixels above the tile (IDT: two tiles each way,
    so the exporter keeps the number of tiles dynamic), else above 64; not multiples of anything."""
    side = effective_tile(model, None) or 64
    return side + 9, side + 13


@torch.no_grad()
def export_onnx(model: nn.Module, encoder: Optional[nn.Module], path: str, size: Optional[Sequence[int]] = None,
                opset: int = DEFAULT_OPSET, overlap: int = DEFAULT_OVERLAP, optimize: bool = True) -> None:
    """Write the ``RestoreGraph`` of ``model`` (and ``encoder``) to ``path`` as one ONNX file.

    ``size``: (H, W) of the example input the graph is traced with (default ``example_size``); H and
    W stay dynamic. A tiled backbone needs an example larger than its tile.
    The exporter is torch.export's (``dynamo=True``, needs onnxscript): the TorchScript one cannot
    trace DRSformer's shape-dependent layer norm with dynamic sizes, nor IDT's tile loop.
    """
    if opset < DEFAULT_OPSET:
        raise UserError(f"--opset {opset} is too old: Resize has antialias (the encoder's view) from opset "
                        f"{DEFAULT_OPSET}; use --opset {DEFAULT_OPSET} or newer")
    check_writable(path)
    graph = RestoreGraph(model.eval(), None if encoder is None else encoder.eval(), overlap).requires_grad_(False)
    size = tuple(size) if size is not None else example_size(model)
    tile = effective_tile(model, None)
    if tile is not None and min(size) <= tile:
        raise UserError(f"--size {size[0]} {size[1]}: {type(model).__name__} works in tiles of {tile}; the example "
                        f"must be larger than a tile each way (e.g. --size {tile + 9} {tile + 13})")
    example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.export.export(graph, (example,), dynamic_shapes=({2: dynamic, 3: dynamic},))
    onnx_program = torch.onnx.export(program, (example,), input_names=["rain"], output_names=["derained"],
                                     opset_version=opset, custom_translation_table=_solve_translation(),
                                     optimize=optimize, verbose=False)
    try:
        with atomic_path(path) as tmp:
            onnx_program.save(tmp, external_data=False)
    except OSError as exc:
        raise UserError(f"--save_path {path}: cannot write ({exc.strerror or exc})") from None
