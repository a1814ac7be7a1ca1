"""Both sides of every size edge in padding and tiling (utils/tiling.py, the tile floors of
utils/eval/memory.py and utils/eval/inference.py): each test sits exactly on a limit and one past it.
Expected values are worked out by hand or with numpy, never with the function under test."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils.eval.memory as memory
from utils.errors import UserError
from utils.eval.inference import effective_tile
from utils.eval.memory import MemoryPlanner, TilePlan
from utils.tiling import PROGRESS_MIN_FORWARDS, fewest_pixels_tile, pad_to, pad_to_multiple, tile_boxes, tiled_apply


def _image(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)


def _np_pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> np.ndarray:
    return np.pad(x[0, 0].numpy(), ((0, ph), (0, pw)), mode=mode)


# ------------------------------------------------------------------ pad_to
def test_pad_to_exact_size_is_the_input_and_one_more_row_pads():
    x = _image(4, 5)
    assert pad_to(x, 4, 5) is x
    assert pad_to(x, 5, 5).shape[-2:] == (5, 5)
    assert pad_to(x, 4, 6).shape[-2:] == (4, 6)


@pytest.mark.parametrize("ph, mode", [(3, "reflect"), (4, "edge")])  # reflect needs a pad shorter than the side
def test_pad_to_reflects_up_to_one_less_than_the_side_then_replicates(ph, mode):
    x = _image(4, 6)
    out = pad_to(x, 4 + ph, 6 + 2)
    np.testing.assert_array_equal(out[0, 0].numpy(), _np_pad(x, ph, 2, mode))


@pytest.mark.parametrize("pw, mode", [(5, "reflect"), (6, "edge")])
def test_pad_to_width_edge_of_reflection(pw, mode):
    x = _image(6, 6)
    np.testing.assert_array_equal(pad_to(x, 7, 6 + pw)[0, 0].numpy(), _np_pad(x, 1, pw, mode))


def test_pad_to_only_one_side_smaller_pads_that_side_and_keeps_the_other():
    x = _image(4, 8)
    out = pad_to(x, 6, 6)  # taller target, narrower target: the width stays 8, no crop, no extra column
    assert out.shape[-2:] == (6, 8)
    np.testing.assert_array_equal(out[0, 0].numpy(), _np_pad(x, 2, 0, "reflect"))
    out = pad_to(_image(8, 4), 6, 6)
    assert out.shape[-2:] == (8, 6)
    np.testing.assert_array_equal(out[0, 0].numpy(), _np_pad(_image(8, 4), 0, 2, "reflect"))


@pytest.mark.parametrize("h, padded", [(8, 8), (9, 16), (16, 16), (1, 8)])
def test_pad_to_multiple_rounds_up_only_past_a_multiple(h, padded):
    assert pad_to_multiple(_image(h, 8), 8).shape[-2:] == (padded, 8)


# ------------------------------------------------------------------ tile_boxes / fewest_pixels_tile
@pytest.mark.parametrize("size, starts", [
    (4, [0]),           # exactly one tile
    (3, [0]),           # smaller than a tile: padded to one tile
    (5, [0, 1]),        # one pixel past a tile: a second tile, shifted to the end
    (7, [0, 3]),        # tile + stride: the second tile starts at the stride
    (8, [0, 3, 4]),     # one past tile + stride
])
def test_tile_boxes_edges(size, starts):
    # tile 4, overlap 1: stride 3
    assert tile_boxes(size, 4, 4, 1) == [(i, 0) for i in starts]
    assert tile_boxes(4, size, 4, 1) == [(0, j) for j in starts]


def test_fewest_pixels_tile_stops_where_one_more_step_adds_a_tile():
    # 10x10 in tiles of 64 (overlap 4) is one tile; a tile of 10 still covers it, one of 9 needs two per side
    assert fewest_pixels_tile(10, 10, 64, 4) == 10
    assert len(tile_boxes(10, 10, 9, 4)) == 4


def test_fewest_pixels_tile_floor_is_one_more_than_the_overlap():
    assert fewest_pixels_tile(3, 3, 64, 4) == 5
    assert fewest_pixels_tile(1, 1, 64, 1) == 2
    assert fewest_pixels_tile(1, 1, 64, 0) == 1


def test_fewest_pixels_tile_floor_from_smallest():
    assert fewest_pixels_tile(3, 3, 64, 4, smallest=8) == 8
    assert fewest_pixels_tile(3, 3, 64, 4, smallest=6) == 6
    assert fewest_pixels_tile(3, 3, 64, 4, smallest=5) == 5


def test_fewest_pixels_tile_reaches_the_floor_exactly_in_steps_of_the_multiple():
    # 13 -> 9 -> 5 in steps of 4; 5 is the floor (overlap 4 + 1), so it is allowed
    assert fewest_pixels_tile(3, 3, 13, 4, multiple=4) == 5
    # 14 -> 10 -> 6; 2 is under the floor
    assert fewest_pixels_tile(3, 3, 14, 4, multiple=4) == 6


def test_fewest_pixels_tile_keeps_the_tile_when_a_smaller_one_needs_more():
    # 20x20 in tiles of 12 (overlap 4, stride 8): starts 0, 8 -> 4 tiles; a tile of 11 (stride 7): 0, 7, 9 -> 9
    assert len(tile_boxes(20, 20, 12, 4)) == 4 and len(tile_boxes(20, 20, 11, 4)) == 9
    assert fewest_pixels_tile(20, 20, 12, 4) == 12


# ------------------------------------------------------------------ tiled_apply
def test_tiled_apply_overlap_one_less_than_the_tile_works_and_equal_refuses():
    x = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(tiled_apply(lambda t: t * 2, x, tile=4, overlap=3), x * 2)
    with pytest.raises(UserError, match="--tile_overlap"):
        tiled_apply(lambda t: t, x, tile=4, overlap=4)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 4), (4, 5), (5, 3)])
def test_tiled_apply_at_and_past_one_tile(h, w):
    x = torch.rand(1, 3, h, w, dtype=torch.float64)
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return t + 1

    torch.testing.assert_close(tiled_apply(fn, x, tile=4, overlap=1, batch=1), x + 1)
    tiles = len(tile_boxes(max(h, 4), max(w, 4), 4, 1))
    assert len(seen) == tiles == math.prod(1 if s <= 4 else 2 for s in (h, w))


@pytest.mark.parametrize("columns, bar", [(PROGRESS_MIN_FORWARDS - 1, False), (PROGRESS_MIN_FORWARDS, True)])
def test_tiled_apply_shows_a_bar_from_progress_min_forwards_on(monkeypatch, columns, bar):
    import tqdm

    shown = []
    real = tqdm.tqdm

    def spy(*args, **kwargs):
        shown.append(not kwargs.get("disable", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", spy)
    x = torch.rand(1, 3, 4, 4 * columns)  # tile 4, overlap 0: one forward per column
    tiled_apply(lambda t: t, x, tile=4, overlap=0, batch=1, progress=True)
    tiled_apply(lambda t: t, x, tile=4, overlap=0, batch=1, progress=False)
    assert shown == [bar, False]


# ------------------------------------------------------------------ tile floors of the planner and --tile
class _Backbone(nn.Module):
    def __init__(self, multiple: int, tile=None):
        super().__init__()
        self.size_multiple, self.tile_size = multiple, tile

    def forward(self, x, z=None):
        return x


@pytest.mark.parametrize("overlap, multiple, side, half", [
    (32, 1, 130, 65), (32, 1, 129, None),     # floor 2*32 + 1 = 65
    (16, 1, 128, 64), (16, 1, 127, None),     # floor 64 (binds for small overlaps)
    (32, 8, 144, 72), (32, 8, 143, None),     # floor 2*32 + 8 = 72; 143 // 2 = 71 -> 64 in steps of 8
    (32, 64, 256, 128), (32, 64, 255, None),  # floor 2*32 + 64 = 128, reached in steps of 64
])
def test_planner_halves_a_tile_down_to_its_floor(overlap, multiple, side, half):
    planner = MemoryPlanner(_Backbone(multiple), torch.device("cpu"), 2 ** 30, overlap=overlap)
    out = planner.smaller(TilePlan(side, 1, 0), 10_000, 10_000)
    assert (out.tile if out else None) == half
    assert planner.smaller(TilePlan(side, 2, 0), 10_000, 10_000) == TilePlan(side, 1, 0)  # first: half the batch


def test_planner_refuses_a_tile_one_under_the_smallest(monkeypatch):
    monkeypatch.setattr(memory, "current_usage", lambda device: 0)
    h = w = 4000
    fixed = memory.IMAGE_BYTES_PER_PIXEL["cpu"] * h * w + memory.RESERVE
    planner = MemoryPlanner(_Backbone(1), torch.device("cpu"), 0, overlap=32)
    planner.line[False] = (0.0, 1.0, True)  # a measured line: 1 byte per pixel, nothing fixed
    smallest = 65  # max(2 * 32 + 1, 64)
    planner.budget = fixed + math.ceil(memory.MARGIN * smallest ** 2) + 1  # room for a 65x65 tile, not 66
    assert planner.plan(h, w).tile == smallest
    planner.budget = fixed + math.ceil(memory.MARGIN * (smallest - 1) ** 2) + 1  # room for 64x64 only
    with pytest.raises(UserError, match="a 65x65 tile needs"):
        planner.plan(h, w)


@pytest.mark.parametrize("tile, ok", [(16, True), (24, True), (20, False), (0, True)])
def test_effective_tile_must_be_a_multiple(tile, ok):
    model = _Backbone(8)
    if ok:
        assert effective_tile(model, tile) == (tile or None)
    else:
        with pytest.raises(UserError, match="not a multiple"):
            effective_tile(model, tile)


def test_effective_tile_of_a_fixed_tile_backbone():
    model = _Backbone(64, tile=64)
    assert effective_tile(model, None) == 64
    assert effective_tile(model, 64) == 64
    with pytest.raises(UserError, match="must be 64"):
        effective_tile(model, 128)
