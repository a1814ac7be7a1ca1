"""The one Trainer: two stages, two optimizers, resumable, backbone-agnostic.

Stage 1 (``iteration < stage1_iters``) trains the backbone without z. Stage 2 computes z with
the query encoder from the rainy image resized to crop x crop and trains
``base loss + contra_loss_weight * contrastive loss``. The backbone parameters and the CoIC
parameters (CoI-M generators + query encoder) have their own optimizers and schedulers.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from datasets import EpochSampler, MixedRainDataset, TrainItem, parse_data_paths
from losses import ContrastiveLoss
from models import build_encoder, build_model
from models.coim import context_embedding_parameters, modulation_parameters
from utils.checkpoint import read_checkpoint
from utils.errors import UserError
from utils.eval.inference import AMP_DTYPES
from utils.logs import setup_logging
from utils.metrics import psnr
from utils.rng import seed_everything
from utils.train import distributed as dist_utils
from utils.train.bad_steps import GOOD, BadStepMonitor
from utils.train.config import TrainConfig
from utils.train.exemplars import archive_for, build_exemplars
from utils.train.state import CheckpointedRun, list_checkpoints
from utils.train.step import CoICStep

logger = logging.getLogger("coic")

MAX_ROLLBACKS = 3


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at {checkpoint}; "
                         "rerun the same command to resume")
        self.signum, self.checkpoint = signum, checkpoint


class TrainingDiverged(RuntimeError):
    """Bad steps kept coming back after rolling back and halving the learning rate."""


class Trainer(CheckpointedRun):
    """Trains one backbone with its recipe; ``train()`` runs (or resumes) the whole schedule."""

    def __init__(self, args: TrainConfig):
        self.args = args
        self.recipe = args.recipe
        self.dist = dist_utils.init_from_env(use_cuda=bool(args.use_GPU))
        self.device = dist_utils.resolve_device(args, self.dist.local_rank if self.dist.enabled else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if args.sync_bn and self.device.type != "cuda":  # before any data is scanned
            raise UserError("--sync_bn works with CUDA devices only (PyTorch's SyncBatchNorm); drop it on the CPU")
        if self.dist.is_main:
            self._check_save_path(args.save_path)
        setup_logging(args.save_path, self.dist.is_main)
        seed_everything(args.seed)
        self.amp_dtype = AMP_DTYPES[args.amp]

        self.dataset = MixedRainDataset(parse_data_paths(args.data_paths), args.crop_size,
                                        strict=args.strict_data, channel_shuffle=args.channel_shuffle)
        if args.cache_images:  # before any worker forks, so that they share it
            self.dataset.cache_images(progress=self.dist.is_main)
        self._train_loader: Optional[DataLoader] = None  # built once by _loader, workers kept for the run
        self.iters_per_epoch = EpochSampler.batches_per_epoch(len(self.dataset), args.batch_size,
                                                              self.dist.world_size)
        if args.epochs is not None:
            args.tot_iters = args.epochs * self.iters_per_epoch

        self.model = build_model(args.model_name, **args.model_hparams, **args.init_hparams)
        self.encoder = build_encoder(dim=args.dim_in, temperature=args.temperature, momentum=args.momentum)
        if args.sync_bn and self.dist.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.encoder.to(self.device)
        self.loss = self.recipe.make_loss().to(self.device)
        self.step_module = CoICStep(torch.compile(self.model) if args.compile else self.model,
                                    self.encoder, self.loss, ContrastiveLoss(), args.contra_loss_weight)
        self.step_fn: nn.Module = self.step_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Stage 1 leaves generators and encoder unused, 1x1 generators are never used.
            self.step_fn = DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")

        # CoIC parameters: CoI-M generators, context embeddings (transformers) and the query encoder.
        coic = modulation_parameters(self.model) + context_embedding_parameters(self.model)
        coic_ids = {id(p) for p in coic}
        self.base_params = [p for p in self.model.parameters() if id(p) not in coic_ids]
        self.coic_params = coic + list(self.encoder.encoder_q.parameters())
        self.base_opt, self.coic_opt = self.recipe.make_optimizers(self.base_params, self.coic_params, args)
        self.schedulers = []
        if self.recipe.make_scheduler is not None:
            self.schedulers = [self.recipe.make_scheduler(opt, args, self.iters_per_epoch)
                               for opt in (self.base_opt, self.coic_opt)]
        self.archive = archive_for(args.exemplars, self.recipe.rain_pool, args.batch_size * self.dist.world_size)
        self._probe = None  # the probe's images, read once (_log_probe)
        # Exemplar randomness differs per rank (each rank sees other images).
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed + 1000 * self.dist.rank)

        self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.bad_steps = 0  # skipped steps in total (as of the last check_steps)
        self.consecutive_bad = 0  # the run of skipped steps at the last check_steps
        self.monitor = BadStepMonitor(self.device, self.dist)  # device-side counts, read by check_steps
        self._checked_at = 0
        self.rollbacks = 0
        self.lr_scale = 1.0  # halved at every rollback
        self.writer = None
        self._signal: Optional[int] = None  # set by the signal handler
        self._stop_signal: Optional[int] = None  # the signal all ranks agreed to stop on (check_steps)
        resumed = False if args.no_resume else self._resume()
        if not resumed and args.pretrained:
            self._load_pretrained(args.pretrained)
        self._checked_at = self.iteration

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_save_path(path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as exc:
            raise SystemExit(f"error: cannot write to --save_path {path} ({exc.strerror}); pick a writable folder")

    def _tensorboard(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.args.save_path)
        return self.writer

    # ------------------------------------------------------------------ data
    def _loader(self) -> DataLoader:
        """The run's one DataLoader, set to the current epoch and batch (workers live across epochs).

        The sampler's keys carry the epoch, and the dataset draws that epoch's real pairs (SPA)
        itself, so workers never need a fresh copy of the dataset.
        """
        loader = self._train_loader
        if loader is None:
            sampler = EpochSampler(len(self.dataset), self.args.batch_size, self.args.seed,
                                   rank=self.dist.rank, world_size=self.dist.world_size)
            # Leave one core to the training process itself.
            workers = min(self.args.num_workers, max(0, (os.cpu_count() or 1) - 1))
            # Its own generator: starting an epoch then never draws from the global RNG, which
            # the model may use (drop path), whatever the worker count and across resumes.
            loader = DataLoader(self.dataset, batch_size=self.args.batch_size, sampler=sampler, num_workers=workers,
                                pin_memory=self.device.type == "cuda", drop_last=False,
                                persistent_workers=workers > 0,
                                generator=torch.Generator().manual_seed(self.args.seed))
            self._train_loader = loader
        loader.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        return loader

    # ------------------------------------------------------------------ step
    @property
    def in_stage2(self) -> bool:
        return self.iteration >= self.args.stage1_iters

    def train_step(self, batch) -> dict:
        """One optimisation step, with no host-device sync.

        A step whose loss is non-finite or whose output explodes (the recipe's threshold) must
        not change the weights. The verdict stays on the device: fused optimizers skip their
        update on it (``found_inf``), the fp16 scaler skips it as a non-finite gradient, and the
        counts are read every ``--check_every`` iterations (:meth:`check_steps`).
        Returns the step's tensors for logging; ``skipped`` is a device bool.
        """
        item = TrainItem(*(t.to(self.device, non_blocking=True) for t in batch))
        rain = item.rain.contiguous(memory_format=self.memory_format)
        self.step_module.train()
        self.base_opt.zero_grad(set_to_none=True)
        self.coic_opt.zero_grad(set_to_none=True)
        extra = ()
        stage2 = self.in_stage2
        if stage2:
            gather = (lambda t: dist_utils.all_gather_cat(t, self.dist)) if self.dist.enabled else None
            positive, negatives = build_exemplars(self.args.exemplars, item, self.archive, self.args.n_neg,
                                                  self.generator, gather)
            extra = (item.query, positive, negatives)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            total, base, contra, out, logits = self.step_fn(rain, item.clean, *extra)
        code, peak = self.monitor.verdict(total, out, self.recipe.explode_threshold)
        skipped = code > GOOD
        if self.scaler.is_enabled():  # the scaler skips steps with non-finite gradients: make a bad step one
            total = total * torch.where(skipped, float("nan"), 1.0)  # NaN gradients (not the loss value alone)
        self.scaler.scale(total).backward()
        if self.recipe.grad_clip is not None:
            # As published (DRSformer): every model parameter, CoI-M included; not the encoder.
            self.scaler.unscale_(self.base_opt)
            if stage2:
                self.scaler.unscale_(self.coic_opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip, foreach=True)
        self._optimizer_step(self.base_opt, skipped)
        self._optimizer_step(self.coic_opt, skipped, has_grads=stage2)
        self.scaler.update()
        self.monitor.track(code, peak)
        return {"total": total, "base": base, "contra": contra, "out": out, "rain": rain, "clean": item.clean,
                "logits": logits, "skipped": skipped}

    def _optimizer_step(self, opt: torch.optim.Optimizer, skipped: Tensor, has_grads: bool = True) -> None:
        """Step ``opt`` unless ``skipped`` (a device bool), without reading it on the host when possible."""
        if not has_grads:  # stage 1: the CoIC optimizer has nothing to do
            opt.step()  # (a no-op without gradients; keeps its scheduler in order)
        elif self.scaler.is_enabled():
            self.scaler.step(opt)
        elif opt.defaults.get("fused"):
            opt.found_inf, opt.grad_scale = skipped.float(), None  # the fused kernel skips on the device
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
        elif not bool(skipped):  # an optimizer without a device-side skip: one host sync
            opt.step()

    def check_steps(self) -> bool:
        """Read the skipped-step counts (and, under DDP, agree on a pending signal): the host sync.

        Logs and counts the steps skipped since the last check; rolls back when a run of
        ``--max_bad_steps`` happened. Returns True when the state was rolled back.
        """
        report = self.monitor.read(self._signal)
        if report.signal and self._stop_signal is None:
            self._stop_signal = report.signal
        self.consecutive_bad = report.run
        checked_from, self._checked_at = self._checked_at, self.iteration
        skipped = report.skipped
        if not skipped:
            return False
        self.bad_steps += skipped
        reasons = []
        if report.non_finite:
            reasons.append(f"{report.non_finite} non-finite loss")
        if report.exploded:
            reasons.append(f"{report.exploded} output exploded (max |output| {report.worst:.3g} > "
                           f"{self.recipe.explode_threshold})")
        logger.warning("iterations %d-%d: %d step%s skipped (%s); %d in a row now, %d in total",
                       checked_from + 1, self.iteration, skipped, "s" if skipped > 1 else "",
                       ", ".join(reasons), self.consecutive_bad, self.bad_steps)
        if self.dist.is_main:
            self._tensorboard().add_scalar("bad_steps", self.bad_steps, self.iteration)
        if report.longest >= self.args.max_bad_steps:
            self._roll_back()
            return True
        return False

    def _log(self, stats: dict) -> dict:
        out = stats["out"].detach().clamp(0, 1)
        values = {
            "base_loss": float(stats["base"].detach()),
            "contra_loss": float(stats["contra"].detach()) if stats["contra"] is not None else 0.0,
            "train_psnr": psnr(out, stats["clean"]),
            "lr": self.base_opt.param_groups[0]["lr"],
            "coic_lr": self.coic_opt.param_groups[0]["lr"],
        }
        if stats["logits"] is not None:
            values["contra_acc"] = float((stats["logits"].argmax(1) == 0).float().mean())
        values["skipped_images"] = self.dataset.skipped
        writer = self._tensorboard()
        for k, v in values.items():
            writer.add_scalar(k, v, self.iteration)
        if self.iteration % self.args.image_freq == 0 or self.iteration == self.args.tot_iters:
            import torchvision

            n = min(4, out.shape[0])
            grid = torch.cat([stats["rain"][:n], out[:n], stats["clean"][:n]], dim=0).cpu()
            writer.add_image("rain|output|clean", torchvision.utils.make_grid(grid, nrow=n), self.iteration)
        return values

    def _log_probe(self) -> None:
        """The probe of z (``utils.eval.probe``) on the held-out ``--probe_paths``, to TensorBoard: classes are
        the training folders, fitted on 16 images of each, scored on up to 16 of the matching probe folder."""
        from utils.eval.probe import log_probe, read_probe_sets

        if self._probe is None:
            fit_paths, held_paths = parse_data_paths(self.args.data_paths), parse_data_paths(self.args.probe_paths)
            if len(held_paths) != len(fit_paths):
                raise UserError(f"--probe_paths has {len(held_paths)} folders for {len(fit_paths)} --data_paths "
                                "folders: give one held-out folder per training folder, in the same order")
            labels = [str(i) for i in range(len(fit_paths))]
            self._probe = read_probe_sets(fit_paths, held_paths, labels, 16, 16, self.args.seed)
        r = log_probe(self._tensorboard(), self.encoder, self._probe, self.iteration, self.device)
        logger.info("iteration %d: probe of z: %s", self.iteration, r.summary())

    def _end_of_epoch(self) -> None:
        if self.recipe.scheduler_unit == "epoch":
            for s in self.schedulers:
                s.step()
        self.epoch += 1
        self.batch_in_epoch = 0

    # ------------------------------------------------------------------ bad steps
    def _roll_back(self) -> None:
        """Reload the newest checkpoint and halve both learning rates (and every later one)."""
        if self.rollbacks >= MAX_ROLLBACKS:
            raise TrainingDiverged(
                f"{self.args.max_bad_steps} bad steps in a row again after {self.rollbacks} rollbacks with halved "
                f"learning rates (now x{self.lr_scale:g}); check the data (--strict_data) or lower --lr")
        checkpoints = list_checkpoints(self.args.save_path)
        if not checkpoints:
            raise TrainingDiverged("bad steps before any checkpoint was written; check the data or lower --lr")
        rollbacks, scale, total = self.rollbacks + 1, self.lr_scale * 0.5, self.bad_steps
        failed_at = self.iteration
        self.load_state_dict(read_checkpoint(checkpoints[-1], self.args.trust_checkpoint))
        self.rollbacks, self.lr_scale, self.bad_steps = rollbacks, scale, total
        self.consecutive_bad = 0
        self.monitor.reset()
        self._checked_at = self.iteration
        self._apply_lr_scale(0.5)
        logger.warning("%d bad steps in a row at iteration %d: rolled back to %s (iteration %d) with the learning "
                       "rates halved (x%g of the recipe's)", self.args.max_bad_steps, failed_at, checkpoints[-1],
                       self.iteration, self.lr_scale)

    def _apply_lr_scale(self, factor: float) -> None:
        for opt in (self.base_opt, self.coic_opt):
            for group in opt.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        # Every later rate is ``factor`` x the recipe's: a schedule's floor scales with its start
        # (else a per-iteration cosine drifts back towards the unscaled rates).
        for sched in self.schedulers:
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
            if hasattr(sched, "eta_min"):  # CosineAnnealingLR
                sched.eta_min *= factor
            if hasattr(sched, "eta_mins"):  # CyclicCosineRestart
                sched.eta_mins = [eta * factor for eta in sched.eta_mins]

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # second signal: stop now, no checkpoint
            raise KeyboardInterrupt
        self._signal = signum
        when = "this step" if not self.dist.enabled else "the next check (--check_every)"
        logger.warning("%s received: finishing %s and saving a checkpoint (send it again to stop at once)",
                       signal.Signals(signum).name, when)

    def _install_signal_handlers(self) -> dict:
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return previous

    # ------------------------------------------------------------------ loop
    def train(self) -> str:
        """Train up to ``tot_iters``; returns the path of the last checkpoint.

        Raises ``TrainingInterrupted`` after saving when SIGINT/SIGTERM arrives, and
        ``TrainingDiverged`` when bad steps persist after ``MAX_ROLLBACKS`` rollbacks.
        """
        args = self.args
        checkpoints = list_checkpoints(args.save_path)
        if self.iteration >= args.tot_iters:
            logger.info("already trained %d/%d iterations in %s", self.iteration, args.tot_iters, args.save_path)
            return checkpoints[-1] if checkpoints else self.save()
        if self.iteration == 0:
            self.save()  # the starting point: what a rollback returns to before the first save
            if args.probe_freq and args.probe_paths and self.dist.is_main:
                self._log_probe()  # what z knows before training: the probe's baseline
        logger.info("%s: %d training pairs, %d iterations per epoch, %s, save_path %s", args.model_name,
                    len(self.dataset), self.iters_per_epoch, self.device, args.save_path)
        from tqdm import tqdm

        previous = self._install_signal_handlers()
        bar = tqdm(total=args.tot_iters, initial=self.iteration, desc=f"{args.model_name}", unit="it",
                   dynamic_ncols=True, disable=not self.dist.is_main)
        start, last = time.time(), None
        try:
            while self.iteration < args.tot_iters:
                last = self._train_epoch(bar) or last
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.flush()
        logger.info("trained to iteration %d in %.1f s; last checkpoint %s", self.iteration, time.time() - start, last)
        if self.dataset.skipped:
            logger.warning("%d unreadable training images were skipped (run `python datasets.py check` on the data)",
                           self.dataset.skipped)
        return last

    def _train_epoch(self, bar) -> Optional[str]:
        """Run the rest of the current epoch (or until ``tot_iters``); returns the last checkpoint written."""
        args, last = self.args, None
        for batch in self._loader():
            was_stage2 = self.in_stage2
            stats = self.train_step(batch)
            self.iteration += 1
            self.batch_in_epoch += 1
            if self.recipe.scheduler_unit == "iter":  # skipped steps count: the schedule follows iterations
                for s in self.schedulers:
                    s.step()
            if self.batch_in_epoch >= self.iters_per_epoch:
                self._end_of_epoch()
            logging_now = self.iteration % args.log_freq == 0 or self.iteration == 1
            saving_now = self.iteration % args.save_freq == 0 or self.iteration == args.tot_iters
            # The host reads the device's step verdicts only here; under DDP every rank checks at
            # the same iterations (a pending signal is agreed then), alone a signal is seen at once.
            if (logging_now or saving_now or self.iteration % args.check_every == 0
                    or (self._signal is not None and not self.dist.enabled)):
                if self.check_steps():  # rolled back: restart from the checkpoint's data position
                    bar.n = self.iteration
                    bar.refresh()
                    return None
                if logging_now and self.dist.is_main and self.consecutive_bad == 0:
                    values = self._log(stats)
                    bar.set_postfix(stage=2 if was_stage2 else 1, loss=f"{values['base_loss']:.4f}",
                                    psnr=f"{values['train_psnr']:.2f}")
            bar.update(1)
            if args.probe_freq and args.probe_paths and self.dist.is_main and self.iteration % args.probe_freq == 0:
                self._log_probe()
            if self.iteration == args.stage1_iters and args.stage1_iters < args.tot_iters:
                logger.info("stage 1 done at iteration %d: CoIC (z + contrastive loss) starts", self.iteration)
            saved = None
            # No periodic save inside a run of bad steps: a rollback must land before it.
            if (saving_now and self.consecutive_bad == 0) or self.iteration == args.tot_iters:
                saved = last = self.save()
            if self._stop_signal is not None:
                raise TrainingInterrupted(self._stop_signal, saved or self.save())
            if self.iteration >= args.tot_iters:
                break
        return last
