"""``reproduce.py EXPERIMENT``: an experiment of ``utils.paper.experiments`` as a list of ordinary commands.

Each step is a ``train_<Backbone>.py``, ``test_model.py``, ``python -m analysis.<tool>`` (or, for the
demo, ``datasets.py demo``) command line, printed before it runs in a subprocess, so that any step
can be rerun by hand. A step is skipped when its result is complete:

- a training, when its final checkpoint ``ckpt_<tot_iters>.pth`` exists (checkpoints are written
  atomically); otherwise the same command resumes from the newest checkpoint in its ``--save_path``;
- an evaluation, when its ``summary.csv`` (written once, atomically, at the end of
  ``test_model.py --testset``) lists every test set with a score in the expected protocol (NIQE
  columns for ``--metrics niqe``) and is newer than the checkpoint it scores;
- an analysis, when its output files exist and are newer than the checkpoint;
- the demo data, when its completion marker exists.

The tables (``utils.paper.collect``) are rebuilt from whatever results exist.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from models import available_models
from utils import ROOT
from utils.allocator import keep_freed_memory
from utils.cli import Parser, add_alias, add_list
from utils.data.specs import dataset_spec, find_dataset_folder, split_folder
from utils.errors import DataError, UserError, cli_main
from utils.metrics import PROTOCOLS
from utils.paper.collect import read_summary, summary_name
from utils.paper.experiments import EXPERIMENTS, Experiment, Variant, experiment
from utils.train.recipes import get_recipe

# --tiny: the recipes' tiny configuration and a run of a few iterations (what tests/conftest.py's
# train_flags uses), so the whole demo runs in seconds.
TINY_FLAGS = (("tiny", None), ("tot_iters", 6), ("save_freq", 2), ("log_freq", 1), ("image_freq", 3), ("n_neg", 2),
              ("num_workers", 0))
TINY_STAGE1 = 3


@dataclass(frozen=True)
class Options:
    experiment: Experiment
    backbones: tuple[str, ...]
    data_root: str
    runs_root: str = "runs"
    results_root: str = "results"
    gpus: int = 1  # 0: the CPU; > 1: torchrun with one process per GPU
    protocol: str = "coic"
    tiny: bool = False
    demo_iters: Optional[int] = None


@dataclass(frozen=True)
class Run:
    """One training of the experiment and where it lands."""
    backbone: str
    variant: Variant
    seed: Optional[int]
    save_path: str
    tot_iters: int
    name: str  # <Backbone>_<variant>[_seed<k>]

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.save_path, f"ckpt_{self.tot_iters:07d}.pth")


@dataclass(frozen=True)
class Step:
    kind: str  # "data", "train", "eval" or "analysis"
    title: str
    command: tuple[str, ...]  # as printed: "python"/"torchrun" first
    output: str  # where its result lands
    is_done: Callable[[], bool]
    run: Optional[Run] = None
    needs: Optional[str] = None  # a file an earlier step makes (the checkpoint an evaluation scores)
    data: tuple[str, ...] = ()  # the dataset folders it reads

    @property
    def phase(self) -> str:
        """What ``--only`` selects it by: train (data and training) or eval (evaluation and analysis)."""
        return "train" if self.kind in ("data", "train") else "eval"

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


# ------------------------------------------------------------------ the plan
def script(name: str) -> str:
    """A script of this repository, as a path relative to the working directory when it is inside it."""
    path = os.path.join(ROOT, name)
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def dataset_folder(name: str, root: str, split: str) -> str:
    """The ``split`` folder of a dataset under ``root``: a public one (any of its folder names, as
    ``utils.data.specs`` knows them; the first name when none exists yet) or ``root/<name>/<split>``."""
    try:
        spec = dataset_spec(name)
    except DataError:
        return os.path.join(root, name, split)
    folder = find_dataset_folder(root, spec) or os.path.join(root, spec.folders[0])
    return split_folder(folder, spec, split)


def _train_flags(opts: Options) -> tuple[dict, int]:
    """The experiment's extra train flags and its CoIC runs' stage 1, after --tiny / --demo_iters."""
    training = opts.experiment.training
    if opts.tiny:
        return dict(TINY_FLAGS), TINY_STAGE1
    flags, stage1 = dict(training.flags), training.stage1_iters
    if opts.demo_iters is not None:
        flags.update(tot_iters=opts.demo_iters, save_freq=max(1, opts.demo_iters // 3))
        stage1 = opts.demo_iters // 3
    return flags, stage1


def plan_runs(opts: Options) -> list[Run]:
    training = opts.experiment.training
    flags, _ = _train_flags(opts)
    runs = []
    for backbone in opts.backbones:
        tot = int(flags.get("tot_iters", get_recipe(backbone).tot_iters))
        for variant in training.variants:
            for seed in training.seeds:
                name = f"{backbone}_{variant.key}" + (f"_seed{seed}" if len(training.seeds) > 1 else "")
                runs.append(Run(backbone, variant, seed, os.path.join(opts.runs_root, training.group, name), tot, name))
    return runs


def _device_flags(opts: Options) -> list[str]:
    """One GPU as the published commands name it; under torchrun each process takes its LOCAL_RANK's."""
    return [] if opts.gpus == 0 else ["--use_GPU", "--gpu_id", "0"] if opts.gpus == 1 else ["--use_GPU"]


def train_command(run: Run, opts: Options) -> list[str]:
    recipe = get_recipe(run.backbone)
    flags, coic_stage1 = _train_flags(opts)
    weight = recipe.contra_loss_weight if run.variant.contra_loss_weight is None else run.variant.contra_loss_weight
    stage1 = coic_stage1 if run.variant.stage1_iters is None else run.variant.stage1_iters
    data = ",".join(dataset_folder(n, opts.data_root, "train") for n in opts.experiment.training.train_sets)
    args = ["--model_name", run.backbone, *_device_flags(opts),
            "--contra_loss_weight", str(float(weight)), "--stage1_iters", str(stage1),
            "--data_paths", data, "--save_path", run.save_path]
    if run.seed is not None:
        args += ["--seed", str(run.seed)]
    for key, value in flags.items():
        if key != "batch_size":
            args += [f"--{key}"] + ([] if value is None else [str(value)])
    batch = int(flags.get("batch_size") or (recipe.tiny.get("batch_size") if opts.tiny else None) or recipe.batch_size)
    if opts.gpus > 1:
        if batch % opts.gpus:
            raise UserError(f"--gpus {opts.gpus}: {run.backbone}'s batch of {batch} images cannot be split evenly "
                            f"over {opts.gpus} processes; use a --gpus that divides {batch}")
        args += ["--batch_size", str(batch // opts.gpus)]  # --batch_size is per process under torchrun
        return ["torchrun", "--standalone", "--nproc_per_node", str(opts.gpus), script(f"train_{run.backbone}.py"),
                *args]
    if "batch_size" in flags:
        args += ["--batch_size", str(batch)]
    return ["python", script(f"train_{run.backbone}.py"), *args]


def eval_folder(run: Run, opts: Options) -> str:
    evaluation = opts.experiment.evaluation
    tail = "niqe" if evaluation.metrics == "niqe" else opts.protocol
    return os.path.join(opts.results_root, opts.experiment.name, run.name, tail)


def eval_command(run: Run, opts: Options) -> list[str]:
    evaluation = opts.experiment.evaluation
    metric = ["--metrics", "niqe"] if evaluation.metrics == "niqe" else ["--metric_protocol", opts.protocol]
    return ["python", script("test_model.py"), "--test_model", run.checkpoint, "--model_name", run.backbone,
            "--load_mode", run.variant.load_mode, "--testset", ",".join(evaluation.test_sets),
            "--data_root", opts.data_root, *metric, *evaluation.flags, "--save_path", eval_folder(run, opts),
            *_device_flags(replace(opts, gpus=min(opts.gpus, 1)))]


def _newer(path: str, than: str) -> bool:
    return os.path.isfile(path) and (not os.path.isfile(than) or os.path.getmtime(path) >= os.path.getmtime(than))


def evaluation_done(run: Run, opts: Options) -> bool:
    """Its summary.csv scores every test set as asked, and was written after the checkpoint."""
    summary = os.path.join(eval_folder(run, opts), "summary.csv")
    if not _newer(summary, run.checkpoint):
        return False
    rows = read_summary(summary)
    evaluation = opts.experiment.evaluation
    for name in evaluation.test_sets:
        row = rows.get(summary_name(name))
        if row is None or not row.get("images"):
            return False
        if evaluation.metrics == "niqe":
            if row.get("niqe_out") in (None, ""):
                return False
        elif row.get("psnr") in (None, "") or row.get("protocol") != opts.protocol:
            return False
    return True


def analysis_folder(run: Run, tool: str, opts: Options) -> str:
    return os.path.join(opts.results_root, opts.experiment.name, run.name, tool.rsplit(".", 1)[-1])


def plan(opts: Options) -> list[Step]:
    """Every step of the experiment, in the order they run."""
    exp = opts.experiment
    steps: list[Step] = []
    if exp.demo:
        from utils.data.demo import is_complete

        root = opts.data_root
        steps.append(Step("data", "demo data", ("python", script("datasets.py"), "demo", root), root,
                          lambda: is_complete(root)))
    for run in plan_runs(opts):  # each run trained, then scored: the table fills as the experiment goes
        train_data = tuple(dataset_folder(n, opts.data_root, "train") for n in exp.training.train_sets)
        steps.append(Step("train", f"train {run.backbone} {run.variant.label}" +
                          (f", seed {run.seed}" if run.name.endswith(f"seed{run.seed}") else ""),
                          tuple(train_command(run, opts)), run.checkpoint,
                          lambda r=run: os.path.isfile(r.checkpoint), run, data=train_data))
        if exp.evaluation is not None:
            what = "NIQE" if exp.evaluation.metrics == "niqe" else f"{opts.protocol} PSNR/SSIM"
            steps.append(Step("eval", f"evaluate {run.name} ({what} on {', '.join(exp.evaluation.test_sets)})",
                              tuple(eval_command(run, opts)), os.path.join(eval_folder(run, opts), "summary.csv"),
                              lambda r=run: evaluation_done(r, opts), run, run.checkpoint,
                              data=tuple(dataset_folder(n, opts.data_root, "test")
                                         for n in exp.evaluation.test_sets)))
        for tool in exp.analyses:
            out = analysis_folder(run, tool.tool, opts)
            data = [dataset_folder(n, opts.data_root, tool.split) for n in tool.data]
            model_flag = ["--model_name", run.backbone] if tool.checkpoint_flag == "--test_model" else []
            command = ("python", "-m", tool.tool, tool.checkpoint_flag,
                       run.checkpoint, *model_flag, "--data_paths", *data, "--labels", *tool.data, *tool.flags,
                       "--save_path", out)
            outputs = [os.path.join(out, f) for f in tool.outputs]
            steps.append(Step("analysis", f"{tool.title} of {run.name}", command, out,
                              lambda o=outputs, r=run: all(_newer(p, r.checkpoint) for p in o), run, run.checkpoint,
                              data=tuple(data)))
    return steps


def check_data(steps: Sequence[Step], only: Optional[str], data_root: str) -> None:
    """Refuse, before the first step, when a dataset folder a step still to run reads is missing: a
    run that trains for days must not find a test set missing at its end."""
    # --only eval skips an evaluation whose training is not there yet (``execute``): it reads nothing
    waiting = {id(s) for s in steps if only is not None and s.needs is not None and not os.path.isfile(s.needs)}
    needed = dict.fromkeys(d for s in steps if only in (None, s.phase) and s.kind != "data" and not s.is_done()
                           and id(s) not in waiting for d in s.data)
    missing = [d for d in needed if not os.path.isdir(d)]
    if missing:
        raise DataError(f"{len(missing)} dataset folder(s) this run needs are missing: {', '.join(missing)}; "
                        f"prepare them (docs: datasets) and check with: python datasets.py check {data_root}")


# ------------------------------------------------------------------ running
def _argv(command: Sequence[str]) -> list[str]:
    """What actually runs: this Python for "python", its torch.distributed.run for "torchrun"."""
    head = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    return head.get(command[0], [command[0]]) + list(command[1:])


def _run_command(command: Sequence[str]) -> int:
    # ``python -m analysis.<tool>`` finds this repository from any working directory.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(_argv(command), env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the step got the signal too: let it save its checkpoint and stop
            print("waiting for the running step to stop (it saves a checkpoint)...", file=sys.stderr, flush=True)


def execute(steps: Sequence[Step], dry_run: bool, only: Optional[str]) -> list[Step]:
    """Print every step (with its state); unless ``dry_run``, run the ones not done yet. Returns the
    steps that ran. A step that fails stops the experiment with what to do next."""
    selected = [s for s in steps if only in (None, s.phase)]
    ran = []
    for i, step in enumerate(selected, 1):
        done = step.is_done()
        # Only --only eval meets a step whose input is not there yet (a full run trains first).
        blocked = (not done and not dry_run and only is not None and step.needs is not None
                   and not os.path.isfile(step.needs))
        state = ("done, skipped" if done else f"not yet: {step.needs} is missing" if blocked
                 else "would run" if dry_run else "running")
        print(f"[{i}/{len(selected)}] {step.title}  ({state})\n    -> {step.output}", flush=True)
        if (done or blocked) and not dry_run:
            continue
        print(f"    $ {step.shell}", flush=True)
        if dry_run:
            continue
        code = _run_command(step.command)
        ran.append(step)
        if code != 0:
            again = "rerun the same reproduce.py command to resume" if code >= 128 else \
                "fix the cause (see the step's own error above), then rerun the same reproduce.py command"
            raise StepFailed(f"step {i} ({step.title}) stopped with exit code {code}; {again}", code)
        if not step.is_done():
            raise StepFailed(f"step {i} ({step.title}) ended but its result {step.output} is not complete; "
                             "see the step's output above", 1)
    return ran


class StepFailed(UserError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Run one of the paper's experiments as ordinary train/test commands: resumable, with the "
                           "paper's numbers beside ours (results/<experiment>/table.md and .csv).")
    p.add_argument("experiment", nargs="?", choices=list(EXPERIMENTS),
                   help="; ".join(f"{e.name}: {e.title}" for e in EXPERIMENTS.values()))
    p.add_argument("--demo", action="store_true", help="the demo experiment: the same machinery in miniature on the "
                   "built-in demo data, on the CPU (same as the experiment name 'demo')")
    add_list(p, "--models", default=None, metavar="NAME",
             help="backbones to run (space- or comma-separated; default: the experiment's)")
    add_alias(p, "--backbones", "--models")
    p.add_argument("--data_root", default=None, help="folder holding the datasets (default: datasets; the demo: "
                   "$COIC_DEMO_ROOT or demo_data)")
    p.add_argument("--runs_root", default="runs", help="trainings go to <runs_root>/<group>/<run>")
    p.add_argument("--results_root", default="results", help="evaluations and tables go to <results_root>/<experiment>")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per training: 0 = CPU, 1 = --use_GPU, N > 1 = "
                   "torchrun with N processes and the batch split so that the global batch is the recipe's "
                   "(default: 1; the demo: 0)")
    p.add_argument("--metric_protocol", default="coic", choices=list(PROTOCOLS),
                   help="PSNR/SSIM protocol of the evaluations (the paper's is coic)")
    p.add_argument("--dry_run", action="store_true", help="print every command in order and where its result lands; "
                   "run nothing")
    p.add_argument("--only", choices=["train", "eval", "table"], default=None,
                   help="run only the trainings (with the demo data), only the evaluations and analyses, or only "
                        "rebuild the table")
    p.add_argument("--demo_iters", type=int, default=None,
                   help=f"iterations per demo run (default: the BRN demo recipe's, {get_recipe('BRN').demo['tot_iters']}; "
                        "with this flag the CoIC runs start stage 2 after a third)")
    p.add_argument("--tiny", action="store_true", help="the recipes' tiny configuration and a few iterations per "
                   "run (tests, smoke runs)")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    name = args.experiment or ("demo" if args.demo else None)
    if name is None:
        raise UserError(f"name an experiment ({', '.join(EXPERIMENTS)}) or pass --demo")
    if args.demo and name != "demo":
        raise UserError(f"--demo runs the demo experiment; drop either --demo or {name!r}")
    exp = experiment(name)
    backbones = exp.training.backbones
    if args.models:
        backbones = tuple(args.models)
        unknown = [b for b in backbones if b not in available_models()]
        if unknown:
            raise UserError(f"--models {' '.join(unknown)}: choose from {', '.join(available_models())}")
    if args.demo_iters is not None and (not exp.demo or args.demo_iters < 3):
        raise UserError("--demo_iters applies to the demo only and must be at least 3")
    gpus = args.gpus if args.gpus is not None else (0 if exp.demo else 1)
    if gpus < 0:
        raise UserError(f"--gpus must be 0 (CPU) or more, got {gpus}")
    if exp.demo:
        from utils.data.demo import default_root

        data_root = args.data_root or default_root()
    else:
        data_root = args.data_root or "datasets"
    return Options(exp, backbones, data_root, args.runs_root, args.results_root, gpus, args.metric_protocol,
                   args.tiny, args.demo_iters)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()

    def work() -> int:
        from utils.paper.collect import write_tables

        opts = options_from_args(args)
        steps = plan(opts)
        if not args.dry_run and args.only != "table" and not opts.experiment.demo:
            check_data(steps, args.only, opts.data_root)  # the demo's first step makes its data
        try:
            if args.only != "table":
                execute(steps, args.dry_run, args.only)
        except StepFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.code
        table_dir = os.path.join(opts.results_root, opts.experiment.name)
        if args.dry_run:
            print(f"tables: {os.path.join(table_dir, 'table.md')} and table.csv (rebuilt from the results after "
                  "the steps)")
            return 0
        if args.only in (None, "eval", "table"):
            runs = plan_runs(opts)
            summaries = {r.name: os.path.join(eval_folder(r, opts), "summary.csv") for r in runs} \
                if opts.experiment.evaluation else {}
            folders = {r.name: {a.tool: analysis_folder(r, a.tool, opts) for a in opts.experiment.analyses}
                       for r in runs}
            md = write_tables(opts.experiment, runs, summaries, table_dir, opts.protocol, folders)
            print(md)
            print(f"tables written to {os.path.join(table_dir, 'table.md')} and table.csv")
        return 0

    return cli_main(work)
