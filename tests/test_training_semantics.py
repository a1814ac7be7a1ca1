"""What one CoIC step computes and what the learning rates do over a run, checked against
independent computations (the published step's formulas written out here), not against the
Trainer's own outputs."""
import os

import pytest
import torch
from helpers import make_trainer

from datasets import TrainItem
from utils.train.recipes import cosine_restarts

MOMENTUM = 0.999  # the published MoCo momentum


def _hand_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE with the positive at index 0, written out: mean(logsumexp - logit_0)."""
    return (torch.logsumexp(logits.double(), dim=1) - logits.double()[:, 0]).mean()


def _stage2_step(tmp, data, weight):
    """A trainer in the CoIC stage from its first step, its first batch, and one step on it."""
    trainer = make_trainer(tmp, data, tot_iters=2, stage1_iters=0, contra_loss_weight=weight, n_neg=2)
    batch = next(iter(trainer._loader()))
    q_before = [p.detach().clone() for p in trainer.encoder.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in trainer.encoder.encoder_k.parameters()]
    seen = {}
    contrast = trainer.encoder.contrast

    def spy(query, positive, negatives, **kw):
        seen.update(query=query.detach().clone(), positive=positive.detach().clone(),
                    negatives=negatives.detach().clone())
        return contrast(query, positive, negatives, **kw)

    trainer.encoder.contrast = spy
    stats = trainer.train_step(batch)
    grads = [p.grad.detach().clone() for p in trainer.encoder.encoder_q.parameters()]
    return dict(trainer=trainer, batch=batch, stats=stats, grads=grads, q_before=q_before,
                k_before=k_before, seen=seen)


@pytest.fixture(scope="module")
def steps(tmp_path_factory, tiny_demo):
    data = os.path.join(tiny_demo, "heavy", "train")
    return {w: _stage2_step(tmp_path_factory.mktemp(f"w{w}"), data, w) for w in (0.0, 0.2, 0.4)}


def test_contrastive_term_is_weight_times_infonce(steps):
    for w, s in steps.items():
        logits = s["stats"]["logits"].detach()
        assert logits.shape == (2, 4)  # positive + rain-aware + 2 detail-aware negatives
        expected = w * _hand_cross_entropy(logits)
        assert float(s["stats"]["contra"].detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    # the same start: the base loss does not depend on the weight
    bases = [float(s["stats"]["base"].detach()) for s in steps.values()]
    assert bases == pytest.approx([bases[0]] * 3, rel=1e-6)


def test_the_objective_is_base_plus_weight_times_infonce(steps):
    """What backward runs on, written out: base + w * InfoNCE (from the step's own logits)."""
    for w, s in steps.items():
        stats = s["stats"]
        expected = float(stats["base"].detach()) + w * float(_hand_cross_entropy(stats["logits"].detach()))
        assert float(stats["total"].detach()) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_batches_are_train_items_by_name(steps):
    batch = steps[0.2]["batch"]
    assert isinstance(batch, TrainItem)
    assert batch.rain.shape == batch.clean.shape and batch.query.shape == batch.query_clean.shape
    # rain brightens: each rainy field is above its clean partner, pixel by pixel (independent of the names'
    # order in the tuple: a swapped pair fails here)
    assert bool((batch.rain >= batch.clean - 1 / 255).all()) and float((batch.rain - batch.clean).mean()) > 0.01
    assert float((batch.query - batch.query_clean).mean()) > 0.01


def test_query_encoder_gradient_scales_with_the_weight(steps):
    g0, g2, g4 = (steps[w]["grads"] for w in (0.0, 0.2, 0.4))
    # total = base + w * contrastive: the gradient is affine in w
    contra_02 = [b - a for a, b in zip(g0, g2)]
    contra_04 = [c - a for a, c in zip(g0, g4)]
    scale = max(float(t.abs().max()) for t in contra_04)
    assert scale > 1e-6  # the contrastive loss really reaches the query encoder
    for d2, d4 in zip(contra_02, contra_04):
        torch.testing.assert_close(d4, 2 * d2, atol=1e-4 * scale, rtol=1e-3)


def test_weight_zero_gradient_is_the_base_loss_alone(steps, tmp_path, tiny_demo):
    # Independently: z from the query encoder, the base loss, backward; no contrastive term.
    data = os.path.join(tiny_demo, "heavy", "train")
    fresh = make_trainer(tmp_path, data, tot_iters=2, stage1_iters=0, contra_loss_weight=0.0, n_neg=2)
    batch = steps[0.0]["batch"]
    rain, clean, query = batch.rain, batch.clean, batch.query
    fresh.step_module.train()
    z, _ = fresh.encoder.encoder_q(query)
    base, _ = fresh.loss(fresh.model, rain, clean, z)
    base.backward()
    for ours, theirs in zip(steps[0.0]["grads"], fresh.encoder.encoder_q.parameters()):
        torch.testing.assert_close(ours, theirs.grad, atol=1e-6, rtol=1e-4)


def test_step_trains_query_encoder_and_moves_key_encoder_by_ema(steps):
    s = steps[0.2]
    trainer = s["trainer"]
    coic_params = {id(p) for g in trainer.coic_opt.param_groups for p in g["params"]}
    assert all(id(p) in coic_params for p in trainer.encoder.encoder_q.parameters())
    changed = [not torch.equal(a, p.detach()) for a, p in zip(s["q_before"], trainer.encoder.encoder_q.parameters())]
    assert sum(changed) > 0.9 * len(changed)
    # MoCo: k <- m k + (1 - m) q, with the query encoder as it was before the optimiser step
    for k0, q0, k1 in zip(s["k_before"], s["q_before"], trainer.encoder.encoder_k.parameters()):
        torch.testing.assert_close(k1.detach(), MOMENTUM * k0 + (1 - MOMENTUM) * q0, atol=1e-7, rtol=1e-6)


def test_query_is_the_resized_rainy_image_and_exemplars_pair_with_it(steps):
    s = steps[0.2]
    small_rain, small_clean = s["batch"].query, s["batch"].query_clean
    seen = s["seen"]
    assert torch.equal(seen["query"], small_rain)
    assert not torch.equal(seen["query"], small_clean)
    for b in range(small_rain.shape[0]):
        q = small_rain[b]
        assert any(torch.equal(seen["positive"][b], o) for o in (q, q.flip(-1), q.flip(-2), q.flip(-1).flip(-2)))
        # detail-aware negatives: this sample's clean image, blurred (and maybe flipped): no rain
        for neg in seen["negatives"][b, 1:]:
            own = min(float((u - small_clean[b]).abs().mean())
                      for u in (neg, neg.flip(-1), neg.flip(-2), neg.flip(-1).flip(-2)))
            other = min(float((u - small_clean[1 - b]).abs().mean())
                        for u in (neg, neg.flip(-1), neg.flip(-2), neg.flip(-1).flip(-2)))
            assert own < other


def test_no_coic_command_never_modulates_and_leaves_coic_parameters(tmp_path, tiny_demo, monkeypatch):
    # The paper's baseline command: --contra_loss_weight 0 --stage1_iters 40000000.
    data = os.path.join(tiny_demo, "light", "train")
    trainer = make_trainer(tmp_path, data, tot_iters=3, stage1_iters=40000000, contra_loss_weight=0.0)
    codes = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, z=None: (codes.append(z), forward(x, z))[1])
    coic = [p.detach().clone() for p in trainer.coic_params]
    base = [p.detach().clone() for p in trainer.base_params]
    trainer.train()
    assert len(codes) == 3 and all(z is None for z in codes)
    assert all(torch.equal(a, b.detach()) for a, b in zip(coic, trainer.coic_params))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(base, trainer.base_params))
    # ... while a CoIC run with the same weight 0 but a short stage 1 does modulate and train them
    other = make_trainer(tmp_path / "coic", data, tot_iters=3, stage1_iters=1, contra_loss_weight=0.0)
    coic = [p.detach().clone() for p in other.coic_params]
    other.train()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(coic, other.coic_params))


# --------------------------------------------------------------------------- learning rates
def _record_lrs(trainer):
    """Wrap train_step to record (iteration, backbone lr, CoIC lr) of every step actually run."""
    seen = []
    step = trainer.train_step

    def recording(batch):
        seen.append((trainer.iteration, trainer.base_opt.param_groups[0]["lr"],
                     trainer.coic_opt.param_groups[0]["lr"]))
        return step(batch)

    trainer.train_step = recording
    return seen


def test_epoch_milestones_resume_after_an_epoch_boundary(tmp_path, tiny_demo):
    # 8 pairs, batch 2: 4 iterations per epoch. Milestone at epoch 1: x0.2 from iteration 4 on.
    data = os.path.join(tiny_demo, "multiangle", "train")
    flags = dict(stage1_iters=3, extra=["--milestone", "1"])
    full = make_trainer(tmp_path / "full", data, tot_iters=10, **flags)
    full_lrs = _record_lrs(full)
    full.train()
    expected = [1e-3] * 4 + [2e-4] * 6
    assert [it for it, _, _ in full_lrs] == list(range(10))
    assert [lr for _, lr, _ in full_lrs] == pytest.approx(expected, rel=1e-12)
    assert [lr for _, _, lr in full_lrs] == pytest.approx(expected, rel=1e-12)

    make_trainer(tmp_path / "part", data, tot_iters=5, save_freq=100, **flags).train()
    resumed = make_trainer(tmp_path / "part", data, tot_iters=10, save_freq=100, **flags)
    assert resumed.iteration == 5
    resumed_lrs = _record_lrs(resumed)
    resumed.train()  # crosses the epoch boundary at 8: no milestone there
    assert resumed_lrs == full_lrs[5:]


SHORT_RESTARTS = dict(make_scheduler=cosine_restarts([3, 4, 6], [2e-4, 1e-4, 1e-6]))
DRS_TINY = ["--dim", "16", "--num_blocks", "1", "1", "1", "1"]


def _hand_restart_lr(step: int, base: float = 3e-4) -> float:
    import math

    starts, periods, etas = [0, 3, 7], [3, 4, 6], [2e-4, 1e-4, 1e-6]
    i = max(k for k, s in enumerate(starts) if s <= step)
    t = min(step - starts[i], periods[i])
    return etas[i] + (base - etas[i]) * (1 + math.cos(math.pi * t / periods[i])) / 2


@pytest.fixture(scope="module")
def drs_full(tmp_path_factory, tiny_demo):
    data = os.path.join(tiny_demo, "multiangle", "train")
    trainer = make_trainer(tmp_path_factory.mktemp("drs_full"), data, model="DRSformer",
                           recipe_changes=SHORT_RESTARTS, extra=DRS_TINY, tot_iters=11, stage1_iters=3, crop_size=16)
    lrs = _record_lrs(trainer)
    trainer.train()
    return lrs


def test_per_iteration_schedule_resumes_mid_cycle(tmp_path, tiny_demo, drs_full):
    # DRSformer's recipe: AdamW, cyclic cosine restarts stepped every iteration (short cycles here).
    assert [lr for _, lr, _ in drs_full] == pytest.approx([_hand_restart_lr(i) for i in range(11)], rel=1e-12)
    data = os.path.join(tiny_demo, "multiangle", "train")
    common = dict(model="DRSformer", recipe_changes=SHORT_RESTARTS, extra=DRS_TINY, stage1_iters=3, crop_size=16,
                  save_freq=100)
    make_trainer(tmp_path, data, tot_iters=5, **common).train()  # stops inside the second cycle
    resumed = make_trainer(tmp_path, data, tot_iters=11, **common)
    lrs = _record_lrs(resumed)
    resumed.train()
    assert lrs == drs_full[5:]


def test_rollback_halves_every_later_learning_rate(tmp_path, tiny_demo, drs_full):
    data = os.path.join(tiny_demo, "multiangle", "train")
    trainer = make_trainer(tmp_path, data, model="DRSformer", recipe_changes=SHORT_RESTARTS, extra=DRS_TINY,
                           tot_iters=11, stage1_iters=3, crop_size=16, save_freq=4, max_bad_steps=2)
    bad = {5, 6}
    inner = trainer.step_module.loss

    class Poisoned(torch.nn.Module):
        def forward(self, model, rain, clean, z):
            value, out = inner(model, rain, clean, z)
            return (value * float("nan") if trainer.iteration in bad else value), out

    trainer.step_module.loss = Poisoned()
    original = trainer._roll_back

    def roll_back():
        bad.clear()
        original()

    trainer._roll_back = roll_back
    lrs = _record_lrs(trainer)
    trainer.train()
    assert trainer.rollbacks == 1
    its = [it for it, _, _ in lrs]
    assert its == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10]  # rolled back to ckpt_4 after 5 and 6
    full = {it: (a, b) for it, a, b in drs_full}
    for k, (it, base_lr, coic_lr) in enumerate(lrs):
        factor = 1.0 if k < 7 else 0.5  # halved from the rollback to the end of the run
        assert base_lr == pytest.approx(factor * full[it][0], rel=1e-9), (k, it)
        assert coic_lr == pytest.approx(factor * full[it][1], rel=1e-9), (k, it)


def test_stage_switch_is_announced_once(tmp_path, tiny_demo, caplog):
    import logging

    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), tot_iters=4, stage1_iters=2)
    with caplog.at_level(logging.INFO, logger="coic"):
        trainer.train()
    assert caplog.text.count("stage 1 done at iteration") == 1
    assert "stage 1 done at iteration 2:" in caplog.text


@pytest.mark.parametrize("amp,expected", [("off", None), ("bf16", torch.bfloat16)])
def test_amp_flag_sets_the_autocast_of_the_forward(tmp_path, tiny_demo, monkeypatch, amp, expected):
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), tot_iters=2, stage1_iters=1,
                           extra=["--amp", amp])
    seen = []
    forward = trainer.model.forward

    def spy(x, z=None):
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return forward(x, z)

    monkeypatch.setattr(trainer.model, "forward", spy)
    trainer.train()
    assert seen == [expected, expected]
