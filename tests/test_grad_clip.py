"""The recipe's gradient clip (DRSformer, 0.01) covers every model parameter, CoI-M generators and
context embeddings included, as the published train_DRSformer.py (clip_grad_norm_(model.parameters()));
the encoder is not clipped."""
import os

import torch

from helpers import make_trainer
from models.coim import context_embedding_parameters, modulation_parameters


def _norm(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    return float(torch.sqrt(sum((g * g).sum() for g in grads))) if grads else 0.0


def test_the_clip_covers_coim_and_context_embeddings_not_the_encoder(tmp_path, tiny_demo, monkeypatch):
    limit = 1e-6  # far below any unclipped norm, so a parameter left out of the clip shows at once
    trainer = make_trainer(tmp_path, os.path.join(tiny_demo, "heavy", "train"), "DRSformer", stage1_iters=0,
                           recipe_changes={"grad_clip": limit})
    seen = {}

    def capture(opt, skipped, has_grads=True):
        if "model" not in seen:  # after backward and the clip, before the first optimizer step
            seen["model"] = _norm(trainer.model.parameters())
            seen["coim"] = _norm(modulation_parameters(trainer.model) + context_embedding_parameters(trainer.model))
            seen["encoder"] = _norm(trainer.encoder.encoder_q.parameters())

    monkeypatch.setattr(trainer, "_optimizer_step", capture)
    from datasets import TrainItem

    trainer.train_step(TrainItem(*next(iter(trainer._loader()))))
    assert seen["model"] <= limit * (1 + 1e-4)
    assert seen["coim"] > 0  # the generators had gradients (and the norm above includes them)
    assert seen["encoder"] > 10 * limit  # the encoder keeps its own gradient
