"""reproduce.py: the experiments' command lists against the paper's flags and the recipes, the tables
against hand-computed differences, and the demo end to end at tiny size, killed and rerun."""
from __future__ import annotations

import csv
import glob
import os
import shlex
import statistics

import pytest

import reproduce
import test_model
from models import BACKBONES
from utils.paper.experiments import DEMO_SEEDS
from utils.train.config import parse_train_args
from utils.train.recipes import RECIPES

# The paper's backbones are those the authors published code for (the registry's published_code).
PAPER_BACKBONES = [name for name, b in BACKBONES.items() if b.published_code is not None]
# Written out from the issue, the published README and README's recipe table, not from the code.
TOTAL_ITERS = {"BRN": 260000, "RCDNet": 260000, "DGUNet": 400000, "IDT": 400000, "DRSformer": 400000}
COIC_WEIGHT = {"BRN": 0.2, "RCDNet": 50.0, "DGUNet": 0.2, "IDT": 0.2, "DRSformer": 0.2}
TRAIN_ORDER = ["Rain200H", "Rain200L", "Rain800", "DID", "DDN"]  # the published README's --data_paths
TEST_SETS = "Rain200L,Rain200H,Rain800,DID,DDN"  # the paper's column order


def dry_run(capsys, *argv) -> list[list[str]]:
    """The commands a dry run prints, in order, each split as a shell would."""
    assert reproduce.main([*argv, "--dry_run"]) == 0
    return [shlex.split(line.split("$ ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "    $ " in line]


def flag(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, (name, cmd)
    return cmd[cmd.index(name) + 1]


def roots(tmp_path) -> list[str]:
    return ["--data_root", "D", "--runs_root", str(tmp_path / "runs"), "--results_root", str(tmp_path / "res")]


def test_main_dry_run_is_the_paper_protocol(capsys, tmp_path):
    unwritten = [n for n in PAPER_BACKBONES if n not in TOTAL_ITERS or n not in COIC_WEIGHT]
    assert not unwritten, f"tests/test_reproduce.py: write the paper's TOTAL_ITERS and COIC_WEIGHT of {unwritten}"
    commands = dry_run(capsys, "main", *roots(tmp_path))
    assert len(commands) == 4 * len(PAPER_BACKBONES)
    for i, name in enumerate(PAPER_BACKBONES):
        for j, (kind, weight, stage1, mode) in enumerate([("plain", 0.0, 40000000, "normal"),
                                                          ("coic", COIC_WEIGHT[name], 40000, "tran")]):
            train, evaluate = commands[4 * i + 2 * j], commands[4 * i + 2 * j + 1]
            assert train[:2] == ["python", f"train_{name}.py"]
            assert float(flag(train, "--contra_loss_weight")) == weight == RECIPES[name].contra_loss_weight * (
                kind == "coic")
            assert int(flag(train, "--stage1_iters")) == stage1
            assert flag(train, "--data_paths") == ",".join(f"D/{d}/train" for d in TRAIN_ORDER)
            assert train[train.index("--use_GPU"):train.index("--use_GPU") + 3] == ["--use_GPU", "--gpu_id", "0"]
            assert "--batch_size" not in train  # one GPU: the recipe's batch
            save = flag(train, "--save_path")
            assert save == str(tmp_path / "runs" / "main" / f"{name}_{kind}")
            args = parse_train_args(name, train[2:])  # the script's own parser takes the command
            assert (args.batch_size, args.tot_iters, args.seed) == (RECIPES[name].batch_size, TOTAL_ITERS[name],
                                                                   RECIPES[name].seed)

            assert evaluate[:2] == ["python", "test_model.py"]
            parsed = test_model.build_parser().parse_args(evaluate[2:])
            assert parsed.test_model == os.path.join(save, f"ckpt_{TOTAL_ITERS[name]:07d}.pth")
            assert (parsed.model_name, parsed.load_mode, parsed.testset, parsed.data_root, parsed.metric_protocol) == (
                name, mode, TEST_SETS.split(","), "D", "coic")
            assert parsed.save_path == str(tmp_path / "res" / "main" / f"{name}_{kind}" / "coic")
            assert parsed.use_GPU and parsed.gpu_id == "0"


def test_spa_dry_run_and_multi_gpu_batches(capsys, tmp_path):
    commands = dry_run(capsys, "spa", *roots(tmp_path))
    assert [c[1] for c in commands] == ["train_DRSformer.py", "test_model.py"] * 2
    for train, evaluate in (commands[:2], commands[2:]):
        assert flag(train, "--data_paths") == ",".join([f"D/{d}/train" for d in TRAIN_ORDER] + ["D/spa"])
        assert flag(evaluate, "--testset") == TEST_SETS + ",SPA"
    assert [(float(flag(c, "--contra_loss_weight")), int(flag(c, "--stage1_iters"))) for c in commands[::2]] == [
        (0.0, 40000000), (0.2, 40000)]

    # Two GPUs: torchrun, the recipe's global batch of 4 split into 2 per process.
    train = dry_run(capsys, "spa", *roots(tmp_path), "--gpus", "2")[0]
    assert train[:5] == ["torchrun", "--standalone", "--nproc_per_node", "2", "train_DRSformer.py"]
    args = parse_train_args("DRSformer", train[5:])
    assert args.batch_size * 2 == 4 and args.use_GPU
    assert reproduce.main(["spa", "--gpus", "3", "--dry_run", *roots(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--gpus 3" in err and "4" in err and len(err.splitlines()) == 1
    # BRN's batch of 12 over 4 GPUs: 3 each.
    brn = dry_run(capsys, "main", "--models", "BRN", "--gpus", "4", *roots(tmp_path))[0]
    assert flag(brn, "--batch_size") == "3"


def test_realint_scores_the_spa_models_by_niqe(capsys, tmp_path):
    commands = dry_run(capsys, "realint", *roots(tmp_path))
    spa = dry_run(capsys, "spa", *roots(tmp_path))
    assert commands[0::2] == spa[0::2]  # the same trainings, into the same folders
    for evaluate, mode in zip(commands[1::2], ("normal", "tran")):
        assert flag(evaluate, "--testset") == "RealInt" and flag(evaluate, "--metrics") == "niqe"
        assert flag(evaluate, "--niqe_channel") == "gray"  # the published eval_niqe.py: pyiqa's grey NIQE
        parsed = test_model.build_parser().parse_args(evaluate[2:])
        assert parsed.metrics == ["niqe"] and parsed.testset == ["RealInt"]
        assert flag(evaluate, "--load_mode") == mode and "--metric_protocol" not in evaluate
        assert flag(evaluate, "--test_model").startswith(str(tmp_path / "runs" / "spa"))


def test_realint_table_reads_the_niqe_columns(tmp_path, capsys):
    res = tmp_path / "res"
    header = "dataset,images,psnr,ssim,niqe_rain,niqe_out,niqe_change,protocol,niqe_channel\n"
    for kind, out in (("plain", 4.1234), ("coic", 3.5)):
        folder = res / "realint" / f"DRSformer_{kind}" / "niqe"
        folder.mkdir(parents=True)
        (folder / "summary.csv").write_text(header + f"RealInt,146,,,5.0000,{out:.4f},{out - 5:.4f},coic,gray\n")
    assert reproduce.main(["realint", "--dry_run", *roots(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("(done, skipped)") == 2 and out.count("(would run)") == 2  # scored; the trainings are not
    (res / "realint" / "DRSformer_coic" / "niqe" / "summary.csv").write_text(header + "RealInt,146,,,5.0,,,coic,gray\n")
    assert reproduce.main(["realint", "--dry_run", *roots(tmp_path)]) == 0
    assert capsys.readouterr().out.count("(done, skipped)") == 1  # no NIQE of the output: not done
    assert reproduce.main(["realint", "--only", "table", *roots(tmp_path)]) == 0
    md = (res / "realint" / "table.md").read_text()
    assert "| DRSformer | w/o CoIC | 5.000 | 4.123 |" in md and "| DRSformer | w/ CoIC | 5.000 |  |" in md
    assert "`gray` channel" in md


def test_analysis_commands_parse_with_the_tools(capsys, tmp_path):
    from analysis import dataset_relationships, modulation_temperature, representation_map

    commands = dry_run(capsys, "analysis", *roots(tmp_path))
    tools = {"analysis.representation_map": representation_map, "analysis.dataset_relationships":
             dataset_relationships, "analysis.modulation_temperature": modulation_temperature}
    assert commands[0][1] == "train_DGUNet.py" and [c[1:3] for c in commands[1:]] == [["-m", t] for t in tools]
    checkpoint = os.path.join(flag(commands[0], "--save_path"), "ckpt_0400000.pth")
    for cmd in commands[1:]:
        args = tools[cmd[2]].build_parser().parse_args(cmd[3:])
        assert checkpoint in (getattr(args, "feat_ext", None), getattr(args, "test_model", None))
    assert representation_map.build_parser().parse_args(commands[1][3:]).projection == "sphere"
    assert [c[2] for c in dry_run(capsys, "analysis", "--only", "eval", *roots(tmp_path))] == list(tools)


def test_paper_table_beside_ours(tmp_path, capsys):
    """spa's table from hand-made summaries: ours, the README's values, their differences, the CoIC gain."""
    res = tmp_path / "res"
    sets = ["Rain200L", "Rain200H", "Rain800", "DID", "DDN", "SPA"]
    ours = {"plain": [39.00, 29.50, 28.85, 35.00, 33.00, 45.00], "coic": [39.90, 30.00, 29.00, 35.00, 34.00, 46.00]}
    for kind, values in ours.items():
        folder = res / "spa" / f"DRSformer_{kind}" / "coic"
        folder.mkdir(parents=True)
        protocol = {"plain": ["coic"] * 6, "coic": ["coic"] * 5 + ["matlab"]}[kind]
        rows = [f"{s},10,{v:.4f},0.900000,{p}" for s, v, p in zip(sets, values, protocol)]
        (folder / "summary.csv").write_text("dataset,images,psnr,ssim,protocol\n" + "\n".join(rows) + "\n")
    assert reproduce.main(["spa", "--only", "table", *roots(tmp_path)]) == 0
    md = (res / "spa" / "table.md").read_text()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| ")]
    table = [r for r in rows if len(r) == 10]  # Backbone, Model, Source, six sets, Mean
    diffs = [r[3:] for r in table if r[2] == "ours − paper"]
    # w/o CoIC: 39.00 - 39.32, 29.50 - 29.27, 28.85 - 28.85, 35.00 - 34.91, 33.00 - 33.71, 45.00 - 45.46
    assert diffs[0][:6] == ["-0.32", "+0.23", "+0.00", "+0.09", "-0.71", "-0.46"]
    assert diffs[1][5] == "-0.03 ⚠"  # w/ CoIC SPA: 46.00 - 46.03 under matlab, flagged
    gain = next(r[3:] for r in table if r[1].startswith("CoIC gain") and r[2] == "ours")
    assert gain == ["+0.90", "+0.50", "+0.15", "+0.00", "+1.00", "+1.00", f"{(sum(ours['coic']) - sum(ours['plain'])) / 6:+.2f}"]
    paper_gain = next(r[3:9] for r in table if r[1].startswith("CoIC gain") and r[2] == "paper")
    assert paper_gain == ["+0.38", "+1.04", "+0.88", "+0.11", "+0.23", "+0.57"]  # the README's own gains
    assert "39.00 / 0.9000" in md and "⚠" in md  # ours' SPA (w/ CoIC) was scored under matlab: flagged
    with open(res / "spa" / "table.csv", newline="") as f:
        records = list(csv.DictReader(f))
    paper = [r for r in records if r["source"] == "paper" and r["model"] == "w/ CoIC"]
    assert [float(r["psnr"]) for r in paper] == [39.70, 30.31, 29.73, 35.02, 33.94, 46.03]
    assert all("README" in r["reference"] for r in paper)


def test_a_failed_step_stops_with_what_to_do(capsys):
    from utils.paper.runner import Step, StepFailed, execute

    step = Step("train", "a killed training", ("python", "-c", "import sys; sys.exit(130)"), "nowhere",
                lambda: False)
    with pytest.raises(StepFailed, match="exit code 130.*rerun the same reproduce.py command to resume"):
        execute([step], dry_run=False, only=None)
    ok_but_empty = Step("eval", "an evaluation", ("python", "-c", "pass"), "summary.csv", lambda: False)
    with pytest.raises(StepFailed, match="not complete"):
        execute([ok_but_empty], dry_run=False, only=None)


def test_only_eval_waits_for_missing_trainings(tmp_path, capsys):
    assert reproduce.main(["spa", "--only", "eval", *roots(tmp_path)]) == 0  # nothing trained: nothing runs
    out = capsys.readouterr().out
    assert "train_DRSformer.py" not in out and out.count("not yet: ") == 2 and "$ " not in out


def _ran(out: str) -> list[str]:
    """Titles of the steps a (real) run started."""
    return [ln.split("] ", 1)[1].split("  (")[0] for ln in out.splitlines() if ln.endswith("(running)")]


def _summary_psnr(path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {r["dataset"]: float(r["psnr"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> str:
    """Demo data with test pictures smaller than ``tiny_demo``'s: the demo runs 8 commands, 4 of them evaluations."""
    from utils.data.demo import build_demo_data

    return build_demo_data(str(tmp_path_factory.mktemp("small_demo") / "demo_data"), train_per_source=1,
                           train_size=32, test_size=24)


def _in_process(command) -> int:
    """Run a printed ``python train_X.py ...`` / ``python test_model.py ...`` step in this process (no
    interpreter start, no torch import: the first demo run is 8 steps); the rerun below uses subprocesses."""
    from utils.train import run
    assert command[0] == "python", command
    name = os.path.basename(command[1])[:-3]
    if name.startswith("train_"):
        return run.main(name[len("train_"):], list(command[2:]))
    assert name == "test_model", command
    return test_model.main(list(command[2:]))


@pytest.mark.slow  # end to end, 15-55 s: `pytest -m ""` and CI run it
def test_demo_end_to_end_then_killed_and_rerun(tmp_path, small_demo, capsys, monkeypatch):
    import utils.paper.runner

    argv = ["--demo", "--tiny", "--data_root", small_demo, "--runs_root", str(tmp_path / "runs"),
            "--results_root", str(tmp_path / "res")]
    with monkeypatch.context() as patch:
        patch.setattr(utils.paper.runner, "_run_command", _in_process)
        assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    seeds = DEMO_SEEDS
    runs = [f"BRN_{v}_seed{s}" for v in ("plain", "coic") for s in seeds]
    assert _ran(out) == [t for r in runs for t in (
        f"train BRN {'w/o' if 'plain' in r else 'w/'} CoIC, seed {r[-1]}",
        f"evaluate {r} (coic PSNR/SSIM on light, heavy, hazy, multiangle)")]
    assert "datasets.py demo" not in out.split("(done, skipped)")[1]  # the data was there: skipped, not run

    # The table against the summaries read here: per-seed cells, the paired differences, their mean and sd.
    res = tmp_path / "res" / "demo"
    psnr = {r: _summary_psnr(res / r / "coic" / "summary.csv") for r in runs}
    md = (res / "table.md").read_text()
    for r in runs:
        assert f"{psnr[r]['light']:.2f} / " in md
    rows = {tuple(c.strip() for c in ln.strip().strip("|").split("|")[:3]): ln.strip().strip("|").split("|")[3:]
            for ln in md.splitlines() if ln.startswith("| ")}
    diffs = []
    for s in seeds:  # Backbone, Model, Seed | light, heavy, hazy, multiangle, Mean
        d = psnr[f"BRN_coic_seed{s}"]["heavy"] - psnr[f"BRN_plain_seed{s}"]["heavy"]
        assert rows[("BRN", "CoIC − w/o (paired)", str(s))][1].strip() == f"{d:+.2f}"
        diffs.append(d)
    assert rows[("BRN", "CoIC gain (w/ − w/o)", "mean")][1].strip() == f"{statistics.mean(diffs):+.2f}"
    assert rows[("", "CoIC gain (w/ − w/o)", "sd over seeds")][1].strip() == f"{statistics.stdev(diffs):.2f}"
    types = ("light", "heavy", "hazy", "multiangle")
    mean_diffs = [statistics.mean(psnr[f"BRN_coic_seed{s}"][t] - psnr[f"BRN_plain_seed{s}"][t] for t in types)
                  for s in seeds]
    se = statistics.stdev(mean_diffs) / len(seeds) ** 0.5
    assert f"over {len(seeds)} seeds, CoIC changes the mean PSNR by {statistics.mean(mean_diffs):+.2f} dB" in md
    assert f"(better on {sum(d > 0 for d in mean_diffs)} of {len(seeds)} seeds)" in md
    assert f"the standard error of that mean is {se:.2f} dB" in md

    # Kill: one training lost its final checkpoint (it stopped at iteration 4), one evaluation never finished.
    # The rerun runs its steps as the real commands, in subprocesses.
    coic1 = tmp_path / "runs" / "demo" / "BRN_coic_seed1"
    os.remove(coic1 / "ckpt_0000006.pth")
    assert (coic1 / "ckpt_0000004.pth").is_file()
    os.remove(res / "BRN_plain_seed0" / "coic" / "summary.csv")
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert _ran(out) == ["evaluate BRN_plain_seed0 (coic PSNR/SSIM on light, heavy, hazy, multiangle)",
                         "train BRN w/ CoIC, seed 1",
                         "evaluate BRN_coic_seed1 (coic PSNR/SSIM on light, heavy, hazy, multiangle)"]
    log = open(coic1 / "train.log").read()
    assert "resumed from" in log and "ckpt_0000004.pth at iteration 4" in log
    assert sorted(os.path.basename(p) for p in glob.glob(str(coic1 / "ckpt_*.pth")))[-1] == "ckpt_0000006.pth"
    # A third run has nothing left to do.
    assert reproduce.main(argv) == 0
    assert _ran(capsys.readouterr().out) == []


def _fake_dataset(root, name, split):
    from utils.paper.runner import dataset_folder

    folder = dataset_folder(name, str(root), split)
    os.makedirs(folder, exist_ok=True)
    return folder


def test_a_real_run_checks_all_its_data_before_the_first_step(tmp_path, capsys, monkeypatch):
    """Every training set and every test set of the chosen backbones, listed in one line, before step 1."""
    from utils.paper import runner as steps
    started = []
    monkeypatch.setattr(steps, "_run_command", lambda command: started.append(command) or 0)
    data = tmp_path / "data"
    for name in TRAIN_ORDER:
        _fake_dataset(data, name, "train")
    _fake_dataset(data, "Rain200L", "test")
    argv = ["main", "--models", "BRN", "--data_root", str(data), "--runs_root", str(tmp_path / "runs"),
            "--results_root", str(tmp_path / "res")]
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert started == [] and len(err) == 1 and err[0].startswith("error: 4 dataset folder(s)")
    for name in ("Rain200H", "Rain800", "DID", "DDN"):  # each missing test set is named
        assert f"{os.sep}{name}" in err[0] or f"/{name}" in err[0], (name, err[0])
    assert f"python datasets.py check {data}" in err[0]
    # the training sets were all there: none is listed
    assert all(f"{n}{os.sep}train" not in err[0] and f"{n}/train" not in err[0] for n in TRAIN_ORDER)
    for name in ("Rain200H", "Rain800", "DID", "DDN"):
        _fake_dataset(data, name, "test")
    # all there: the check passes and the first step (a training) starts
    monkeypatch.setattr(steps, "execute", lambda s, dry_run, only: started.append(s[0].kind) or [])
    monkeypatch.setattr("utils.paper.collect.write_tables", lambda *a, **k: "")
    assert reproduce.main(argv) == 0 and started == ["train"]
