"""The training configuration: every ``train_<Backbone>.py``'s flags and the typed config they build.

``parse_train_args`` turns the command line into a ``TrainConfig`` (the defaults come from the
recipe; ``--demo``/``--tiny`` swap in the recipe's smaller ones); tests and scripts can build it
the same way and change fields with ``dataclasses.replace``. The backbone's own flags
(``--milestone``, ``--inter_iter``, ...) differ per recipe, so they live in ``backbone`` and read as
attributes too (``config.milestone``), which is how the recipes' schedulers ask for them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from models.pretrained import WEIGHTS_DIR_ENV, published_names, published_or_path
from utils.cli import Parser, add_alias, add_device_args, add_list, add_precision_args
from utils.errors import UserError
from utils.eval.precision import native_bf16
from utils.train.recipes import Recipe, get_recipe


@dataclass
class TrainConfig:
    model_name: str
    recipe: Recipe
    # run
    data_paths: str
    save_path: str
    save_freq: int
    keep_checkpoints: int
    log_freq: int
    image_freq: int
    no_resume: bool
    pretrained: Optional[str]
    pretrained_encoder: Optional[str]
    max_bad_steps: int
    check_every: int
    strict_data: bool
    seed: int
    num_workers: int
    cache_images: bool
    # device
    use_GPU: bool
    gpu_id: str
    amp: str  # "off", "bf16", "fp16": from --precision
    channels_last: bool
    compile: bool
    sync_bn: bool
    # optimisation
    batch_size: int
    crop_size: int
    lr: float
    tot_iters: int
    epochs: Optional[int]
    stage1_iters: int
    # CoIC
    contra_loss_weight: float
    dim_in: int
    temperature: float
    n_neg: int
    # the backbone
    model_hparams: dict  # what the model is built with (stored in checkpoints)
    init_hparams: dict = field(default_factory=dict)  # passed at construction in training only
    backbone: dict = field(default_factory=dict)  # the recipe's own flags, by name
    demo: bool = False
    tiny: bool = False
    weights_dir: Optional[str] = None  # offline folder of published files (--pretrained NAME)
    trust_checkpoint: bool = False  # load checkpoints with the full (code-running) unpickler
    momentum: float = 0.999  # MoCo momentum of the key encoder
    exemplars: str = "published"  # how the contrastive exemplars are built (utils/train/exemplars.py)
    channel_shuffle: bool = False  # one random colour-channel permutation per training item
    probe_freq: int = 0  # probe z (analysis/probe.py) every N iterations; 0: never
    probe_paths: Optional[str] = None  # held-out folders, one per training folder, for the probe

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        values = vars(ns).copy()
        names = {f.name for f in dataclasses.fields(cls)}
        backbone = {k: values.pop(k) for k in list(values) if k not in names}
        return cls(**values, backbone=backbone)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        backbone = self.__dict__.get("backbone")
        if backbone is not None and name in backbone:
            return backbone[name]
        raise AttributeError(f"{type(self).__name__} has no field or backbone flag {name!r}")

    def flags(self) -> dict:
        """Every flag value, the backbone's included (what checkpoints store under ``args``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("recipe",
                                                                                                   "backbone")}
        return {**values, **self.backbone}


REFERENCE_DATA_PATHS = ("datasets/Rain200H/train,datasets/Rain200L/train,datasets/Rain800/train,"
                        "datasets/DID/train,datasets/DDN/train")


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_train_parser(recipe: Recipe) -> argparse.ArgumentParser:
    p = Parser(description=f"Train {recipe.model_name} on mixed rain datasets, with or without CoIC.")
    g = p.add_argument_group("run")
    g.add_argument("--model_name", default=recipe.model_name, help="backbone to train")
    g.add_argument("--demo", action="store_true",
                   help="build the synthetic demo data if absent, train a small CoIC model on it and evaluate it")
    g.add_argument("--tiny", action="store_true",
                   help="the recipe's tiny configuration (smallest model and batch that run every code path: "
                        "tests and smoke runs); flags typed on the command line still win")
    add_list(g, "--data_paths", default=REFERENCE_DATA_PATHS, metavar="PATH",
             help="training folders, each with rain/ and norain/ (space- or comma-separated; default: the paper's "
                  "five training sets under datasets/)")
    g.add_argument("--save_path", default=None,
                   help="folder for checkpoints, logs and TensorBoard (default: checkpoints/<model>_<dim>d_<w>contra)")
    g.add_argument("--save_freq", type=int, default=5000, help="save a checkpoint every N iterations")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    g.add_argument("--log_freq", type=int, default=40, help="log scalars every N iterations")
    g.add_argument("--image_freq", type=int, default=1000, help="log a rain|output|clean grid every N iterations")
    g.add_argument("--no_resume", action="store_true", help="start afresh even if save_path holds a checkpoint")
    g.add_argument("--pretrained", default=None,
                   help="start from this checkpoint's weights (ours or the published code's) with fresh optimizers, "
                        "or from a published name (downloaded once, with its encoder): " + ", ".join(published_names()))
    g.add_argument("--feat_ext", dest="pretrained_encoder", default=None, metavar="FEAT_EXT",
                   help="encoder weights for --pretrained when they are in a separate file (published MoCo state_dict)")
    add_alias(g, "--pretrained_encoder", "--feat_ext")
    g.add_argument("--weights_dir", default=None,
                   help=f"offline: take a published --pretrained's files from this folder (else ${WEIGHTS_DIR_ENV}), "
                        "never download")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load --pretrained and resumed checkpoints that hold objects beyond tensors with the full "
                        "unpickler, which runs any code they name: only for files from a source you trust")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="consecutive skipped (non-finite/exploding) steps before rolling back with the LR halved")
    g.add_argument("--check_every", type=int, default=20,
                   help="read the skipped-step counts on the host every N iterations (the step itself never "
                        "waits for the device); under torchrun a signal is also agreed on then")
    g.add_argument("--strict_data", action="store_true",
                   help="stop at an unreadable image instead of skipping it with a warning")
    g.add_argument("--seed", type=int, default=recipe.seed, help="random seed")
    g.add_argument("--num_workers", type=int, default=8,
                   help="data loader workers, kept for the whole run (capped at the CPU count - 1)")
    g.add_argument("--cache_images", action="store_true",
                   help="decode every training image once at start and keep it in memory (8-bit images as "
                        "uint8; workers share it); refuses when it would take over 80%% of the available memory")
    g = p.add_argument_group("device")
    add_device_args(g, "train")
    add_precision_args(g, "mixed precision: autocast to bf16 or fp16 (fp16 adds a gradient scaler); auto: float32, "
                          "except --demo on a CPU that computes bf16 natively, which trains in bf16",
                       "auto/contiguous: the default layout; channels_last: faster convolutions on GPUs",
                       recommended=False)
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=recipe.batch_size, help="training batch size")
    g.add_argument("--crop_size", type=int, default=recipe.crop_size, help="training crop size")
    g.add_argument("--lr", type=float, default=recipe.lr, help="initial learning rate")
    g.add_argument("--tot_iters", type=int, default=recipe.tot_iters, help="total training iterations")
    g.add_argument("--epochs", type=int, default=None,
                   help="train for this many epochs of the mixed data instead of --tot_iters")
    g.add_argument("--stage1_iters", type=int, default=recipe.stage1_iters,
                   help="iterations of stage 1 (backbone only, no z) before CoIC starts")
    g = p.add_argument_group("CoIC")
    g.add_argument("--contra_loss_weight", type=float, default=recipe.contra_loss_weight,
                   help="weight of the contrastive loss (0 with a huge --stage1_iters = no CoIC)")
    g.add_argument("--dim_in", type=int, default=128, help="dimension of the code z")
    g.add_argument("--temperature", type=float, default=1.0, help="contrastive temperature")
    g.add_argument("--momentum", type=float, default=0.999,
                   help="MoCo momentum of the key encoder, which gives z at test time (published: 0.999)")
    g.add_argument("--n_neg", type=int, default=4, help="detail-aware negatives per query")
    g.add_argument("--exemplars", default="published", choices=["published", "query"],
                   help="query: the rain-aware negative is the resized query's own background plus another rain "
                        "layer, and flips and blur are drawn per sample; published: as the published scripts "
                        "(the crop's background, the in-batch pool for BRN and IDT, one flip and blur per batch)")
    g.add_argument("--channel_shuffle", action="store_true",
                   help="permute the colour channels of each training item at random (rainy and clean alike)")
    g.add_argument("--probe_freq", type=int, default=0,
                   help="every N iterations, log to TensorBoard how well z tells the training folders' rain "
                        "apart on the held-out --probe_paths (python -m analysis.probe); 0: never")
    add_list(g, "--probe_paths", default=None, metavar="PATH",
             help="held-out folders (rain/ + norain/; space- or comma-separated), one per --data_paths folder in "
                  "the same order, for --probe_freq")
    g = p.add_argument_group(f"{recipe.model_name}")
    for name, flag in recipe.flags.items():
        if flag.nargs in ("+", "*"):
            add_list(g, f"--{name}", type=flag.type, default=flag.default, help=flag.help, nargs=flag.nargs)
        else:
            g.add_argument(f"--{name}", type=flag.type, default=flag.default, help=flag.help, nargs=flag.nargs)
    return p


def parse_train_args(model_name: str, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The typed configuration of ``train_<model_name>.py``'s flags; ``--demo`` (``--tiny``) swaps
    in the recipe's demo (tiny) defaults."""
    recipe = get_recipe(model_name)
    parser = build_train_parser(recipe)
    args = parser.parse_args(argv)
    if args.model_name != model_name:
        parser.error(f"--model_name {args.model_name} does not match this script; "
                     f"use train_{args.model_name}.py to train {args.model_name}")
    # Demo and tiny values replace defaults but never flags the user typed.
    typed = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.demo:
        for key, value in recipe.demo.items():
            if key not in typed:
                setattr(args, key, value)
        if args.precision == "auto" and not args.use_GPU and native_bf16():
            args.precision = "bf16"  # a CPU that computes bf16 natively: the demo trains in it (docs/demo.md)
        if "save_path" not in typed:  # a fine-tune of published weights is a run of its own, never a resume
            args.save_path = f"runs/demo_{model_name}" + (f"_from_{os.path.basename(args.pretrained)}"
                                                          if args.pretrained else "")
    tiny_hparams = {}
    if args.tiny:
        for key, value in recipe.tiny.items():
            if not hasattr(args, key):
                tiny_hparams[key] = value  # a model hyper-parameter without a flag
            elif key not in typed:
                setattr(args, key, value)
    if isinstance(args.data_paths, list):  # the config, and the checkpoints, keep the comma-separated form
        args.data_paths = ",".join(args.data_paths)
    if isinstance(args.probe_paths, list):
        args.probe_paths = ",".join(args.probe_paths)
    args.amp = "off" if args.precision in ("auto", "fp32") else args.precision
    args.channels_last = args.memory_format == "channels_last"
    del args.precision, args.memory_format
    if args.save_path is None:
        args.save_path = f"checkpoints/{model_name}_{args.dim_in}d_{args.contra_loss_weight}contra"
    for key in ("batch_size", "crop_size", "tot_iters", "save_freq", "keep_checkpoints", "log_freq", "n_neg",
                "max_bad_steps", "check_every"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.stage1_iters < 0:
        parser.error("--stage1_iters must be >= 0")
    if not 0.0 <= args.momentum < 1.0:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.probe_freq < 0:
        parser.error(f"--probe_freq must be >= 0 (0: never), got {args.probe_freq}")
    if args.probe_freq and not args.probe_paths and not args.demo:
        parser.error("--probe_freq needs --probe_paths: one held-out folder per --data_paths folder")
    if args.pretrained:  # a typo fails before the data is scanned
        try:
            published = published_or_path(args.pretrained, "--pretrained")
        except UserError as exc:
            parser.error(str(exc))
        if published is not None and published.backbone != model_name:
            parser.error(f"--pretrained {args.pretrained} is a published {published.backbone} model; "
                         f"fine-tune it with train_{published.backbone}.py")
    args.recipe = recipe
    args.model_hparams = {k: getattr(args, k) for k, f in recipe.flags.items() if f.model and not f.init_only}
    args.model_hparams["dim_in"] = args.dim_in
    if recipe.derived_hparams is not None:
        args.model_hparams.update(recipe.derived_hparams(args))
    args.model_hparams.update(tiny_hparams)
    args.init_hparams = {k: getattr(args, k) for k, f in recipe.flags.items()
                         if f.init_only and getattr(args, k) is not None}
    return TrainConfig.from_namespace(args)
