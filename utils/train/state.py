"""What a training run saves and resumes: checkpoints ``ckpt_<iteration>.pth`` in ``--save_path``.

``CheckpointedRun`` is the Trainer's state half: everything a bit-exact resume needs (weights,
both optimizers and schedulers, data position, rain archive, random streams, bad-step counts),
the newest-readable-checkpoint resume, atomic saves, and ``--pretrained`` initialisation.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Optional

import torch

from models.coim import context_embedding_parameters, modulation_parameters
from models.pretrained import fetch_model, published_or_path
from utils.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_weights,
    read_checkpoint,
    remap_published_keys,
    save_atomic,
)
from utils.rng import rng_state, set_rng_state
from utils.train import distributed as dist_utils

logger = logging.getLogger("coic")

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pth$")


def checkpoint_iteration(path: str) -> Optional[int]:
    """The iteration in a checkpoint's file name (``ckpt_<iteration>.pth``); None for any other name."""
    m = CKPT_PATTERN.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def list_checkpoints(save_path: str) -> list[str]:
    """Our checkpoints in ``save_path``, oldest first."""
    found = [(checkpoint_iteration(p), p) for p in glob.glob(os.path.join(save_path, "ckpt_*.pth"))]
    return [p for it, p in sorted((it, p) for it, p in found if it is not None)]


class CheckpointedRun:
    """State of a run; the Trainer supplies model, encoder, optimizers, schedulers, archive and args."""

    def _load_pretrained(self, spec: str) -> None:
        """Start from ``spec``'s weights with fresh optimizers: a checkpoint file (ours or the published
        code's), or a published name (``models.pretrained``: downloaded once, with its encoder).

        A backbone trained without CoIC loads into a CoIC model: its CoI-M generators and context
        embeddings, absent from the file, keep their fresh initialisation.
        """
        published = published_or_path(spec, "--pretrained")
        path, encoder_path = spec, None
        if published is not None:
            path, encoder_path = fetch_model(published, self.args.weights_dir,
                                             encoder=self.args.pretrained_encoder is None)
        trust = self.args.trust_checkpoint
        ckpt = read_checkpoint(path, trust)
        coic_ids = {id(p) for p in modulation_parameters(self.model) + context_embedding_parameters(self.model)}
        coic_names = [name for name, p in self.model.named_parameters() if id(p) in coic_ids]
        state = remap_published_keys(ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {})
        fresh = bool(coic_names) and not any(k in state for k in coic_names)  # all CoIC parts absent, or none
        load_weights(self.model, ckpt, part="model", may_miss=coic_names if fresh else (), trust=trust)
        parts = ["backbone" + (" (trained without CoIC: fresh CoI-M generators)" if fresh else "")]
        encoder_source = self.args.pretrained_encoder or encoder_path or (
            ckpt if isinstance(ckpt, dict) and "encoder" in ckpt else None)
        if encoder_source is not None:
            load_weights(self.encoder, encoder_source, part="encoder", trust=trust)
            parts.append("encoder")
        logger.info("initialised %s from %s%s", " and ".join(parts), path,
                    f" (encoder from {encoder_source})" if isinstance(encoder_source, str) else "")

    def state_dict(self) -> dict:
        return {
            "model_name": self.args.model_name,
            "model_hparams": dict(self.args.model_hparams),
            "encoder_hparams": {"dim": self.args.dim_in, "temperature": self.args.temperature},
            "model": self.model.state_dict(),
            "encoder": self.encoder.state_dict(),
            "base_optim": self.base_opt.state_dict(),
            "coic_optim": self.coic_opt.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "iteration": self.iteration,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "archive": self.archive.state_dict(),
            "scaler": self.scaler.state_dict(),
            "bad_steps": self.bad_steps,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "rng": rng_state(self.generator),
            "args": self.args.flags(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("model_name") != self.args.model_name or state.get("model_hparams") != self.args.model_hparams:
            raise CheckpointError(
                f"checkpoint in {self.args.save_path} is {state.get('model_name')} {state.get('model_hparams')}, "
                f"this run is {self.args.model_name} {self.args.model_hparams}; use another --save_path or --no_resume")
        self.model.load_state_dict(state["model"])
        self.encoder.load_state_dict(state["encoder"])
        self.base_opt.load_state_dict(state["base_optim"])
        # "tran_optim": the name in checkpoints written before the rename (they still resume)
        self.coic_opt.load_state_dict(state["coic_optim"] if "coic_optim" in state else state["tran_optim"])
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        self.iteration, self.epoch = state["iteration"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.archive.load_state_dict(state["archive"], self.device)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.bad_steps = state.get("bad_steps", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.lr_scale = state.get("lr_scale", 1.0)
        set_rng_state(state["rng"], self.generator)
        if self.dist.rank > 0:  # checkpoints hold rank 0's streams: derive the others from it
            torch.manual_seed(self.args.seed + 1000 * self.dist.rank + self.iteration)
            self.generator.manual_seed(self.args.seed + 1000 * self.dist.rank + self.iteration)

    def _resume(self) -> bool:
        """Load the newest readable checkpoint of ``save_path``; False when there is none."""
        unreadable = []
        for path in reversed(list_checkpoints(self.args.save_path)):
            try:
                state = read_checkpoint(path, self.args.trust_checkpoint)
            except UnsafeCheckpointError:
                raise  # never fall back past a refused file: the user must see it and decide
            except CheckpointError as exc:
                logger.warning("%s", exc)
                unreadable.append(path)
                continue
            self.load_state_dict(state)
            if unreadable:
                logger.warning("resuming from %s instead of the unreadable %s", path, ", ".join(unreadable))
            logger.info("resumed from %s at iteration %d", path, self.iteration)
            return True
        if unreadable:
            raise CheckpointError(f"no readable checkpoint in {self.args.save_path} ({', '.join(unreadable)} "
                                  "unreadable); move them away or pass --no_resume")
        return False

    def save(self) -> str:
        """Rank 0 writes ``ckpt_<iteration>.pth`` atomically and prunes old ones; all ranks wait."""
        path = os.path.join(self.args.save_path, f"ckpt_{self.iteration:07d}.pth")
        if self.dist.is_main:
            save_atomic(self.state_dict(), path)
            for old in list_checkpoints(self.args.save_path)[:-self.args.keep_checkpoints]:
                os.remove(old)
        dist_utils.barrier(self.dist)
        return path
