"""Tiled inference: the blend of overlapping tiles, computed by hand."""
import math

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.tiling import blend_weights, fewest_pixels_tile, tile_boxes, tiled_apply


def _position_image(h: int, w: int) -> torch.Tensor:
    """(1,2,H,W): channel 0 the row index, channel 1 the column index."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([rows, cols])[None]


def _tile_constant(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile -> a constant that names its top-left corner: 1 + top + 1000 * left."""
    value = 1 + tiles[:, 0, 0, 0] + 1000 * tiles[:, 1, 0, 0]
    return value.view(-1, 1, 1, 1).expand(-1, 1, *tiles.shape[-2:]).clone()


def _hand_blend(h, w, tile, row_starts, col_starts):
    """Σ_k w_k(p) v_k / Σ_k w_k(p), with w the separable sine window sin(π (t + ½) / tile)."""
    window = np.array([math.sin(math.pi * (t + 0.5) / tile) for t in range(tile)])
    num, den = np.zeros((h, w)), np.zeros((h, w))
    for top in row_starts:
        for left in col_starts:
            weight = np.outer(window, window)
            num[top:top + tile, left:left + tile] += weight * (1 + top + 1000 * left)
            den[top:top + tile, left:left + tile] += weight
    return num / den


@pytest.mark.parametrize("h,w,tile,overlap,rows,cols", [
    (70, 56, 32, 8, [0, 24, 38], [0, 24]),  # 70 leaves a remainder (last tile flush right), 56 = 32 + 24
    (64, 40, 16, 4, [0, 12, 24, 36, 48], [0, 12, 24]),  # 64 = 16 + 4 * 12: no extra last tile
])
def test_blend_of_per_tile_constants(h, w, tile, overlap, rows, cols):
    out = tiled_apply(_tile_constant, _position_image(h, w), tile=tile, overlap=overlap, batch=3)
    assert out.shape == (1, 1, h, w)
    expected = _hand_blend(h, w, tile, rows, cols)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-6, atol=1e-3)


def test_smaller_than_a_tile_is_padded_and_cropped_back():
    out = tiled_apply(_tile_constant, _position_image(20, 25), tile=32, overlap=8)
    assert out.shape == (1, 1, 20, 25)
    assert torch.equal(out, torch.ones_like(out))  # one tile at (0, 0)
    x = torch.rand(1, 3, 20, 25)
    torch.testing.assert_close(tiled_apply(lambda t: t * 2 + 1, x, tile=32, overlap=8), x * 2 + 1)


def test_window_is_centre_heavy_and_positive():
    wts = blend_weights(8)
    assert wts.shape == (8, 8) and float(wts.min()) > 0
    assert float(wts[3:5, 3:5].min()) > float(wts[0].max())
    with pytest.raises(UserError, match="--tile_overlap"):
        tiled_apply(_tile_constant, _position_image(40, 40), tile=16, overlap=16)


def test_bar_of_tiles_only_for_many_forwards(capsys):
    from utils.tiling import PROGRESS_MIN_FORWARDS

    x = torch.rand(1, 3, 16, 16 * PROGRESS_MIN_FORWARDS)  # tiles of 16 without overlap: one per forward
    tiled_apply(lambda t: t, x, tile=16, overlap=0, batch=1, progress=True)
    assert f"/{PROGRESS_MIN_FORWARDS}" in capsys.readouterr().err  # "n/16 forward" on the bar
    tiled_apply(lambda t: t, x, tile=16, overlap=0, batch=2, progress=True)  # half as many forwards: no bar
    tiled_apply(lambda t: t, x, tile=16, overlap=0, batch=1)  # not asked
    assert "tiles" not in capsys.readouterr().err


def test_fewest_pixels_tile_keeps_the_forwards_and_drops_the_waste():
    # 4000 x 3000 in tiles of 1843, overlap 32: 3 columns x 2 rows. By hand, 3 columns need
    # 4000 - t <= 2 (t - 32), t >= 1355; 2 rows need 3000 - t <= t - 32, t >= 1516.
    assert fewest_pixels_tile(3000, 4000, 1843, 32) == 1516
    assert len(tile_boxes(3000, 4000, 1516, 32)) == 6 and len(tile_boxes(3000, 4000, 1515, 32)) > 6
    # in steps of a size multiple of 8: the first multiple-of-8 step below 1843 that still gives 6 tiles
    assert fewest_pixels_tile(3000, 4000, 1840, 32, multiple=8) == 1520
    # one tile already as small as the image allows: unchanged
    assert fewest_pixels_tile(300, 400, 400, 32) == 400
