"""Memory budgets: sizes, counted tensor bytes, tile plans, out-of-memory retries, and the real peak
of ``test_model.py`` under ``--max_memory`` (measured in a fresh process)."""
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.eval import memory
from utils.eval.inference import restore
from utils.eval.memory import GiB, LiveTensorBytes, MemoryPlanner, MiB, TilePlan, forward_peak_bytes, parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_size():
    assert parse_size("8G") == 8 * GiB and parse_size("1.5g") == int(1.5 * GiB)
    assert parse_size("800M") == 800 * MiB and parse_size("2GiB") == 2 * GiB and parse_size("123") == 123
    for bad in ("lots", "-1G", "0", "8X"):
        with pytest.raises(UserError, match="--max_memory"):
            parse_size(bad)


def test_live_bytes_follow_the_tensors_by_hand():
    x = torch.empty(1000, device="meta")
    with LiveTensorBytes() as counter:
        a = x + 1          # 4000 live
        b = a * 2          # 8000
        del a              # 4000
        c = b.view(10, 100)  # a view: no new storage
        d = c.sum()        # 4004
        del b, c, d
    assert counter.peak == 8000 and counter.live == 0


class TinyNet(nn.Module):
    """conv 3->8, relu, conv 8->3, + x: the activations are counted by hand below."""
    size_multiple, tile_size = 8, None

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, z=None):
        h = self.conv1(x)
        h = torch.relu(h)  # conv1's and relu's outputs alive together: 2 x 8 channels x 4 bytes
        return self.conv2(h) + x


def _meta_peak(side, batch=1):
    """The counted peak of TinyNet on a meta-device input (shapes only): the planner's estimate
    is scaled from one small real forward, this is counted at the very size."""
    return forward_peak_bytes(TinyNet().to("meta"), torch.empty(batch, 3, side, side, device="meta"))


def test_forward_peak_of_a_known_net():
    for h, w in ((16, 24), (40, 40)):
        assert forward_peak_bytes(TinyNet(), torch.rand(1, 3, h, w)) == 2 * 8 * 4 * h * w
    assert forward_peak_bytes(TinyNet(), torch.rand(3, 3, 16, 16)) == 3 * 2 * 8 * 4 * 16 * 16
    assert _meta_peak(1000) == 2 * 8 * 4 * 1000 * 1000


@pytest.fixture
def fixed_usage(monkeypatch):
    """The process 'holds' 100 MiB whatever it really does, and a forward's peak is the bytes of its
    tensors (a device without allocator overhead), so plans are reproducible. Probes are counted."""
    probes = []

    def peak(fn, device):
        with LiveTensorBytes() as counter:
            fn()
        probes.append(counter.peak)
        return counter.peak

    monkeypatch.setattr(memory, "current_usage", lambda device: 100 * MiB)
    monkeypatch.setattr(memory, "measured_peak", peak)
    return probes


def _planner(budget, model=None):
    return MemoryPlanner(model or TinyNet(), torch.device("cpu"), budget, overlap=8)


def _fixed(h, w, per_pixel=memory.IMAGE_BYTES_PER_PIXEL["cpu"]):
    return 100 * MiB + per_pixel * h * w + memory.RESERVE


def _needed(side):
    """What a plan must fit: TinyNet's tensor bytes counted at exactly this tile (meta), with the margin."""
    return memory.MARGIN * _meta_peak(side)


def _tiles(h, w, tile, overlap=8):
    """How many tiles of ``tile`` (stride tile - overlap, the last one flush with the edge) cover h x w."""
    per_side = [1 if n <= tile else math.ceil((n - tile) / (tile - overlap)) + 1 for n in (h, w)]
    return per_side[0] * per_side[1]


def test_plan_whole_image_when_it_fits_after_one_probe(fixed_usage):
    plan = _planner(4 * GiB).plan(200, 300)
    assert plan.tile is None and plan.batch == 1 and plan.estimate < 4 * GiB
    assert len(fixed_usage) == 1  # the first probe's bound settles it


def test_plan_takes_the_fewest_forwards_then_the_fewest_pixels(fixed_usage):
    h = w = 3000
    for extra in (200 * MiB, 400 * MiB):
        budget = _fixed(h, w) + extra
        fixed_usage.clear()
        plan = _planner(budget).plan(h, w)
        assert len(fixed_usage) == 2  # tight: a second size measured the line
        assert plan.tile is not None and plan.tile % 8 == 0 and plan.batch == 1
        # the line measured at 64 and 192 pixels holds at the largest side that fits, found here by search
        largest = max(t for t in range(8, h + 1, 8) if _fixed(h, w) + _needed(t) <= budget)
        # the plan covers the image in as many tiles as the largest side, with the smallest side that does
        assert plan.tile <= largest and _tiles(h, w, plan.tile) == _tiles(h, w, largest)
        assert _tiles(h, w, plan.tile - 8) > _tiles(h, w, largest)
    tight, roomy = (_planner(_fixed(h, w) + extra).plan(h, w).tile for extra in (100 * MiB, 400 * MiB))
    assert _tiles(h, w, tight) > _tiles(h, w, roomy)  # more room, fewer forwards
    # scoring against ground truth (100 MB more for a megapixel) leaves less room
    budget = _fixed(1000, 1000, memory.IMAGE_BYTES_PER_PIXEL["cpu"] + memory.SCORING_BYTES_PER_PIXEL) + 30 * MiB
    assert _planner(budget).plan(1000, 1000).tile is None
    assert _planner(budget).plan(1000, 1000, scored=True).tile < 1000


def test_plan_too_small_a_budget_says_what_to_do(fixed_usage):
    with pytest.raises(UserError, match="--max_memory .* less than the run already holds"):
        _planner(50 * MiB).plan(100, 100)
    with pytest.raises(UserError, match="--max_memory .* too small for TinyNet .* tile needs about"):
        _planner(_fixed(1000, 1000) + _needed(64) // 2).plan(1000, 1000)


def test_fixed_tile_backbone_gets_a_batch_of_tiles(fixed_usage, monkeypatch):
    class Tiled(TinyNet):
        tile_size = 32

    monkeypatch.setattr(memory, "default_tile_batch", lambda device: 4)  # as on a GPU: batches allowed
    planner = MemoryPlanner(Tiled(), torch.device("cpu"), 0, overlap=8)
    planner.device = torch.device("cuda")  # image buffers of a GPU run (nothing runs on it)
    planner.budget = int(_fixed(500, 500, memory.IMAGE_BYTES_PER_PIXEL["cuda"]) + 5.5 * _needed(32))
    planner.device = torch.device("cpu")  # the probes run here
    planner.activations(32, 32, None)  # probes one tile and two (batches allowed)
    assert fixed_usage == [_meta_peak(32), _meta_peak(32, batch=2)]
    planner.device = torch.device("cuda")
    assert planner.plan(500, 500).batch == 5
    monkeypatch.setattr(memory, "default_tile_batch", lambda device: 1)  # a CPU: one tile per forward
    assert planner.plan(500, 500) == TilePlan(32, 1, planner.plan(500, 500).estimate)


class OutOfMemoryAbove(TinyNet):
    """Raises the CUDA out-of-memory error for inputs above ``limit`` pixels (a GPU, imitated)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.sizes = limit, []

    def forward(self, x, z=None):
        if x.is_meta:  # the planner's count
            return super().forward(x, z)
        self.sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (imitated)")
        return super().forward(x, z)


def test_out_of_memory_retries_with_smaller_tiles(fixed_usage, caplog):
    torch.manual_seed(0)
    model = OutOfMemoryAbove(limit=70 * 70).eval()
    x = torch.rand(1, 3, 96, 128)
    planner = _planner(4 * GiB, model)
    with caplog.at_level(logging.WARNING, logger="coic.memory"):
        y = restore(model, x, None, overlap=8, planner=planner)
    # (after the planner's 64x64 probe) the whole image fails, then tiles of half its longer side fit
    restored = model.sizes[model.sizes.index((96, 128)):]
    assert restored[0] == (96, 128) and set(restored[1:]) == {(64, 64)} and len(restored) == 1 + 2 * 3
    plain = TinyNet().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(y, restore(plain, x, tile=64, overlap=8))
    assert "out of memory with whole image" in caplog.text and "retrying with tiles of 64x64" in caplog.text
    assert planner.shrink < 1.0  # later images are planned smaller
    with pytest.raises(UserError, match="out of CPU memory even with tiles of 64x64"):
        restore(OutOfMemoryAbove(limit=10).eval(), x, None, overlap=8, planner=_planner(4 * GiB))


def test_evaluate_plans_per_image_and_says_so(tmp_path, fixed_usage, monkeypatch, caplog):
    from utils.eval.evaluation import evaluate
    from utils.images import save_image

    # no peak to read on this "device": the tensors are counted, times the default factor
    monkeypatch.setattr(memory, "measured_peak", lambda fn, device: None)
    torch.manual_seed(0)
    save_image(torch.rand(3, 120, 160), str(tmp_path / "a.png"))
    # room for an 80x80 tile, not for the whole image; no ground truth: NIQE scores the output
    per_pixel = memory.IMAGE_BYTES_PER_PIXEL["cpu"] + memory.SCORING_BYTES_PER_PIXEL
    budget = int(_fixed(120, 160, per_pixel) + memory.KERNEL_FACTOR * _needed(80))
    with caplog.at_level(logging.INFO, logger="coic.memory"):
        evaluate(TinyNet().eval(), None, [(str(tmp_path / "a.png"), None)], str(tmp_path / "out"),
                 torch.device("cpu"), progress=False, max_memory=budget)
    assert "160x120 image: tiles of 80x80, 1 per forward" in caplog.text and "within --max_memory" in caplog.text
    assert os.path.isfile(tmp_path / "out" / "a.png")


def test_an_image_over_the_budget_is_listed_and_the_others_restored(tmp_path, fixed_usage, monkeypatch):
    """The planner's refusal is about one image: evaluate lists it (its row's error names the file and
    --max_memory) and restores the next; strict stops there with one line naming the file."""
    from utils.eval.evaluation import evaluate
    from utils.images import save_image

    monkeypatch.setattr(memory, "measured_peak", lambda fn, device: None)
    torch.manual_seed(0)
    for name, (h, w) in (("big.png", (1000, 1200)), ("small.png", (48, 64))):
        save_image(torch.rand(3, h, w), str(tmp_path / name))
    per_pixel = memory.IMAGE_BYTES_PER_PIXEL["cpu"] + memory.SCORING_BYTES_PER_PIXEL
    budget = int(_fixed(1000, 1200, per_pixel) + memory.KERNEL_FACTOR * _needed(64) // 2)  # no 64x64 tile fits
    items = [(str(tmp_path / n), None) for n in ("big.png", "small.png")]
    rows = evaluate(TinyNet().eval(), None, items, str(tmp_path / "out"), torch.device("cpu"), progress=False,
                    max_memory=budget, strict=False)
    assert [r["name"] for r in rows] == ["big.png", "small.png"]
    assert "big.png" in rows[0]["error"] and "--max_memory" in rows[0]["error"] and not rows[1].get("error")
    assert sorted(os.listdir(tmp_path / "out")) == ["small.png"]
    with pytest.raises(UserError, match=r"big\.png: --max_memory .* too small"):
        evaluate(TinyNet().eval(), None, items, str(tmp_path / "strict"), torch.device("cpu"), progress=False,
                 max_memory=budget, strict=True)


SUBPROCESS = r"""
import os, sys, json
sys.path.insert(0, {root!r})
import test_model
from utils.eval.memory import current_usage
import torch
budget = current_usage(torch.device("cpu")) + {room}
rc = test_model.main({argv!r} + ["--max_memory", str(budget)])
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"rc": rc, "budget": budget, "peak": hwm}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from Linux's /proc")
def test_test_model_peak_rss_stays_within_the_budget(tmp_path):
    """A 600x450 photo through test_model.py with a budget far below the whole image's need: the
    process's peak resident memory (VmHWM, the kernel's count) stays under --max_memory."""
    import numpy as np
    from PIL import Image

    from models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "brn.pth"
    torch.save({"model_name": "BRN", "model_hparams": {"inter_iter": 1},
                "model": build_model("BRN", inter_iter=1).state_dict()}, ckpt)
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((450, 600, 3)) * 255).astype(np.uint8)).save(tmp_path / "photos" / "p.png")
    argv = ["--test_model", str(ckpt), "--model_name", "BRN", "--test_dir", str(tmp_path / "photos"),
            "--save_path", str(tmp_path / "out")]
    # The whole image needs ~1 GiB of activations; 400 MiB above what the process holds forces tiles.
    code = SUBPROCESS.format(root=ROOT, room=400 * MiB, argv=argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0 and "600x450 image: tiles of" in proc.stderr, proc.stderr[-2000:]
    assert result["peak"] <= result["budget"], (result, proc.stderr[-1000:])
    assert os.path.isfile(tmp_path / "out" / "p.png")


@pytest.mark.parametrize("strip", [1, 37, 10 ** 6])
def test_matlab_ssim_in_strips_matches_scikit_image(monkeypatch, strip):
    """Scoring a large pair in bounded memory: the SSIM map in strips of rows (one row, 37 pixels
    rounded to rows, all at once) is scikit-image's SSIM of the same Y images."""
    import numpy as np
    from test_protocols import _skimage_ssim, _uint8_image, _y8_numpy

    from utils import metrics

    monkeypatch.setattr(metrics, "SSIM_STRIP_PIXELS", strip)
    rng = np.random.default_rng(3)
    x = _uint8_image(rng, 45, 52)
    y = (x + 0.08 * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    assert metrics.matlab_ssim(x, y) == pytest.approx(_skimage_ssim(_y8_numpy(x), _y8_numpy(y)), abs=1e-10)
