"""reproduce.py coic_effect: the paired experiment's statistics by hand, and the whole command at tiny size."""
import csv
import math
import os

import pytest

from utils.paper.coic_effect import interval95


def test_interval95_by_hand():
    mean, half, sd = interval95([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == pytest.approx(1.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2 df) = 4.302653
    mean, half, sd = interval95([0.5, -0.1])
    assert mean == pytest.approx(0.2) and sd == pytest.approx(math.sqrt(0.18))
    assert half == pytest.approx(12.706205 * math.sqrt(0.18) / math.sqrt(2), rel=1e-6)
    assert math.isnan(interval95([1.0])[1])


@pytest.mark.slow
def test_the_experiment_end_to_end_at_tiny_size(tmp_path, tiny_demo, capsys):
    from utils.paper.coic_effect import main

    out, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["--tiny", "--seeds", "0", "1", "--iters", "2", "--eval_every", "2", "--jobs", "1",
            "--data_root", tiny_demo, "--runs_root", str(runs), "--save_path", str(out)]
    assert main(argv) == 0
    for name in ("curves.png", "paired.png", "paired.csv", "paired.md", "curves.csv"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "paired.csv") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert [r[0] for r in body] == ["0", "1"]
    diffs = []
    for r in body:  # the mean columns and the difference, recomputed from the per-type columns
        plain, coic = [float(v) for v in r[1:5]], [float(v) for v in r[6:10]]
        assert float(r[5]) == pytest.approx(sum(plain) / 4, abs=2e-3)
        assert float(r[10]) == pytest.approx(sum(coic) / 4, abs=2e-3)
        assert float(r[11]) == pytest.approx(float(r[10]) - float(r[5]), abs=2e-3)
        diffs.append(float(r[11]))
    assert header[-1] == "CoIC − plain"
    printed = capsys.readouterr().out
    assert f"{sum(diffs) / 2:+.2f} dB" in printed
    with open(out / "curves.csv") as f:
        curve = list(csv.DictReader(f))
    assert {(c["arm"], c["seed"], c["iteration"]) for c in curve} == {
        (arm, s, i) for arm in ("plain", "coic") for s in ("0", "1") for i in ("0", "2")}
    # The plain arm never trains its encoder: its probe is the same at every checkpoint.
    plain0 = [c["probe_accuracy"] for c in curve if c["arm"] == "plain" and c["seed"] == "0"]
    assert len(set(plain0)) == 1
    # Rerunning reuses the runs and their evaluations: nothing is trained again.
    mtimes = {p: os.path.getmtime(runs / "coic_seed0" / p) for p in os.listdir(runs / "coic_seed0")
              if p.startswith("ckpt_")}
    assert main(argv) == 0
    assert {p: os.path.getmtime(runs / "coic_seed0" / p) for p in mtimes} == mtimes


def test_the_design_is_checked_before_anything_runs(tmp_path, capsys):
    from utils.paper.coic_effect import main

    assert main(["--iters", "100", "--eval_every", "200", "--save_path", str(tmp_path)]) == 2
    assert "--eval_every" in capsys.readouterr().err
    assert main(["--seeds", "1", "1", "--save_path", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
