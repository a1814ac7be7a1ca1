"""The training step never waits for the device: verdicts, skips and counts stay device tensors."""
import logging
import os

import pytest
import torch
from helpers import make_trainer

from models import available_models

# Every Python-level way of copying a tensor's value to the host (a device sync on a GPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """Count host reads of tensors while ``counting[0]`` is True."""
    calls, counting = [], [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            if counting[0]:
                calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls, counting


class _Patched(torch.nn.Module):
    """The recipe's loss with its (value, output) passed through ``change(value, output)``."""

    def __init__(self, inner, change):
        super().__init__()
        self.inner, self.change = inner, change

    def forward(self, model, rain, clean, z):
        return self.change(*self.inner(model, rain, clean, z))


def _batch(size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(2, 3, size, size, generator=g) for _ in range(4))


# Stage 1 once (the first registered backbone), the CoIC stage for every registered backbone.
@pytest.mark.parametrize("model,stage", [(available_models()[0], 1)] + [(m, 2) for m in available_models()])
def test_step_reads_nothing_back(tmp_path, tiny_demo, host_reads, model, stage):
    # Each recipe's --tiny model and crop, two images per batch.
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), model, stage1_iters=3, n_neg=1,
                           batch_size=2)
    crop = trainer.args.crop_size
    # Every branch of the step: explosion threshold, gradient clipping, both optimizers.
    trainer.recipe = trainer.recipe.replace(explode_threshold=10.0, grad_clip=0.01)
    trainer.iteration = 0 if stage == 1 else 3
    trainer.train_step(_batch(crop))  # warm-up (lazy state: optimizer moments, the rain archive)
    calls, counting = host_reads
    counting[0] = True
    for seed in (1, 2):
        stats = trainer.train_step(_batch(crop, seed=seed))
    counting[0] = False
    assert calls == []
    assert isinstance(stats["skipped"], torch.Tensor) and not stats["skipped"]


def test_fused_skip_leaves_weights_and_optimizer_state(tmp_path, tiny_demo):
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), stage1_iters=0)
    trainer.train_step(_batch())
    assert trainer.base_opt.defaults["fused"] and trainer.coic_opt.defaults["fused"]
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.base_opt.state.items()}
    inner = trainer.step_module.loss
    trainer.step_module.loss = _Patched(inner, lambda value, out: (value * float("nan"), out))
    assert bool(trainer.train_step(_batch(seed=1))["skipped"])
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    for p, s in trainer.base_opt.state.items():
        assert all(torch.equal(moments[id(p)][k], v) for k, v in s.items())  # step count included
    trainer.step_module.loss = inner
    assert not bool(trainer.train_step(_batch(seed=2))["skipped"])
    assert not all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


def test_fp16_scaler_skips_bad_steps_too(tmp_path, tiny_demo):
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), stage1_iters=1, amp="fp16")
    trainer.train_step(_batch())  # stage 1: the CoIC optimizer has no gradients
    trainer.iteration = 1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    inner = trainer.step_module.loss
    trainer.step_module.loss = _Patched(inner, lambda value, out: (value, out * 1e4))
    trainer.recipe = trainer.recipe.replace(explode_threshold=10.0)
    scale = trainer.scaler.get_scale()
    assert bool(trainer.train_step(_batch(seed=1))["skipped"])
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.get_scale() == scale / 2  # skipped as an overflow: the scale backs off


def test_late_check_still_rolls_back(tmp_path, tiny_demo, caplog):
    # Counts are read only every --check_every iterations: a run of bad steps between two checks is
    # found at the next one, counted exactly, and rolled back to the checkpoint before it.
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "hazy", "train"), tot_iters=12, stage1_iters=100,
                           save_freq=10, log_freq=100, check_every=4, max_bad_steps=3)
    bad = {4, 5, 6}
    trainer.step_module.loss = _Patched(
        trainer.step_module.loss,
        lambda value, out: (value * float("nan") if trainer.iteration in bad else value, out))
    original = trainer._roll_back
    rolled_at = []

    def roll_back():
        rolled_at.append(trainer.iteration)
        bad.clear()
        original()

    trainer._roll_back = roll_back
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert rolled_at == [8] and trainer.rollbacks == 1 and trainer.iteration == 12
    assert "iterations 5-8: 3 steps skipped (3 non-finite loss)" in caplog.text
    assert "ckpt_0000000.pth" in caplog.text and trainer.bad_steps == 3
