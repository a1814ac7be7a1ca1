"""The CUDA paths of training (marker ``cuda``): run by ``python -m benchmarks.acceptance`` on a GPU.

Every backbone's training step in both stages in fp32, bf16 + channels-last and fp16 with the
gradient scaler; the fused optimizers' device-side skip; a step without host syncs (CUDA's sync
debug mode); ``--compile`` on BRN; NCCL (two processes with two GPUs, else a one-process group).

The device comes from ``COIC_TEST_DEVICE`` (default ``cuda``; skipped without CUDA).
``benchmarks.acceptance --dry_run`` runs this file with ``COIC_TEST_DEVICE=cpu``: the same
sequence on the CPU at tiny sizes, where sync debug mode becomes a count of host reads, NCCL
becomes gloo and ``--compile`` uses dynamo's eager backend (no C++ compile in the suite).
"""
import functools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import make_trainer

from models import available_models

DEVICE = torch.device(os.environ.get("COIC_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                 reason="CUDA is not available (set COIC_TEST_DEVICE=cpu for the dry run)")]

PRECISIONS = {"fp32": [], "bf16_channels_last": ["--amp", "bf16", "--channels_last"], "fp16_scaler": ["--amp", "fp16"]}


def _batch(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(2, 3, size, size, generator=g) for _ in range(4))


# Both stages from the second step, two images per batch, on DEVICE.
STEP_FLAGS = dict(stage1_iters=1, n_neg=1, batch_size=2, device=str(DEVICE))


@pytest.fixture(scope="module")
def data(tiny_demo):
    return os.path.join(tiny_demo, "heavy", "train")


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", available_models())
def test_training_step_both_stages(tmp_path, data, model, precision):
    trainer = make_trainer(tmp_path, data, model, PRECISIONS[precision], **STEP_FLAGS)
    crop = trainer.args.crop_size
    assert trainer.device.type == DEVICE.type and trainer.scaler.is_enabled() == (precision == "fp16_scaler")
    for stage, iteration in ((1, 0), (2, 1)):
        trainer.iteration = iteration
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        query = [p.detach().clone() for p in trainer.encoder.encoder_q.parameters()]
        # fp16: the scaler starts at 2^16 and skips steps whose gradients overflow while it backs
        # off (RCDNet's loss is on the 0-255 scale); a few steps find its level.
        for attempt in range(20 if trainer.scaler.is_enabled() else 1):
            stats = trainer.train_step(_batch(crop, seed=10 * stage + attempt))
            assert not bool(stats["skipped"]), (model, precision, stage)
            assert torch.isfinite(stats["base"]).all() and stats["out"].shape[-1] == crop
            changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
            moved = any(not torch.equal(a, b) for a, b in zip(query, trainer.encoder.encoder_q.parameters()))
            if changed and moved == (stage == 2):  # (each optimizer's overflow is its own)
                break
        assert changed, f"{model} {precision} stage {stage}: no weight changed"
        assert moved == (stage == 2)  # the query encoder trains in the CoIC stage only
        if stage == 2:
            assert torch.isfinite(stats["contra"]).all()


def test_fused_optimizer_skips_a_bad_step_on_the_device(tmp_path, data):
    trainer = make_trainer(tmp_path, data, **STEP_FLAGS)
    trainer.iteration = 1
    trainer.train_step(_batch(trainer.args.crop_size))
    assert trainer.base_opt.defaults["fused"] and trainer.coic_opt.defaults["fused"]
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.base_opt.state.items()}
    inner = trainer.step_module.loss

    class NaN(torch.nn.Module):
        def forward(self, *args):
            value, out = inner(*args)
            return value * float("nan"), out

    trainer.step_module.loss = NaN()
    assert bool(trainer.train_step(_batch(trainer.args.crop_size, seed=1))["skipped"])
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    for p, s in trainer.base_opt.state.items():
        assert all(torch.equal(moments[id(p)][k], v) for k, v in s.items())


@pytest.mark.parametrize("stage", [1, 2])
def test_step_never_waits_for_the_device(tmp_path, data, monkeypatch, stage):
    trainer = make_trainer(tmp_path, data, "BRN", ["--amp", "bf16", "--channels_last"], **STEP_FLAGS)
    trainer.iteration = stage - 1
    batch = _batch(trainer.args.crop_size)
    trainer.train_step(batch)  # warm-up: lazy optimizer state, the rain archive
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
        try:
            trainer.train_step(_batch(trainer.args.crop_size, seed=1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    reads = []  # on a CPU: every Python-level read of a tensor's value (a sync on a GPU)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n),
                                                                                              _o(self, *a, **k))[1])
    trainer.train_step(_batch(trainer.args.crop_size, seed=1))
    monkeypatch.undo()
    assert reads == []


def test_compile_brn_trains_both_stages(tmp_path, data, monkeypatch):
    if DEVICE.type == "cpu":  # inductor's C++ build takes minutes on a CPU: trace with dynamo only
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    trainer = make_trainer(tmp_path, data, "BRN", ["--compile"], **STEP_FLAGS)
    for iteration in (0, 1):
        trainer.iteration = iteration
        stats = trainer.train_step(_batch(trainer.args.crop_size, seed=iteration))
        assert not bool(stats["skipped"]) and torch.isfinite(stats["base"]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, device: str, out: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    where = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    t = torch.full((4,), float(rank + 1), device=where)
    dist.all_reduce(t)
    torch.save(t.cpu(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_process_group_all_reduce(tmp_path):
    world = 2 if DEVICE.type == "cuda" and torch.cuda.device_count() >= 2 else 1
    if DEVICE.type == "cuda":
        mp.spawn(_rank, args=(world, _free_port(), "cuda", str(tmp_path)), nprocs=world, join=True)
    else:
        _rank(0, 1, _free_port(), "cpu", str(tmp_path))
    expected = float(sum(range(1, world + 1)))
    for r in range(world):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt"), torch.full((4,), expected))
