"""benchmarks/benchmark.py end to end at a tiny size (one BRN case in its worker process)."""
import csv
import os

import torch

from benchmarks import benchmark


def test_benchmark_writes_markdown_and_csv(tmp_path, tiny_demo):
    out = tmp_path / "results"
    rc = benchmark.main(["--models", "BRN", "--small", "--batch_size", "1", "--crop_size", "32",
                         "--infer_size", "32", "--iters", "1", "--warmup", "0", "--threads", "1",
                         "--device", "cpu", "--data_dir", os.path.join(tiny_demo, "light", "train"),
                         "--save_path", str(out)])
    assert rc == 0

    with open(out / "benchmark.csv", newline="") as f:
        header = f.readline()
        assert header.startswith("# device: ") and f"torch {torch.__version__}" in header
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == benchmark.COLUMNS
    # On a CPU both settings are fp32: one row, measured once.
    assert len(rows) == 1
    row = rows[0]
    assert (row["backbone"], row["batch"], row["crop"], row["infer_size"]) == ("BRN", "1", "32", "32")
    for key in ("ours_stage1_img_s", "ours_coic_img_s", "ours_peak_mib", "ours_infer_normal_ms",
                "ours_infer_coic_ms"):
        assert float(row[key]) > 0, key
    assert row["published_stage1_img_s"] == "" and row["note"] == ""

    md = (out / "benchmark.md").read_text()
    assert "| " + " | ".join(benchmark.HEADERS) + " |" in md
    assert "| BRN | fp32 = recommended | 1 | 32 | 32 |" in md


def test_settings_resolve_per_device(monkeypatch):
    import utils.eval.precision

    monkeypatch.setattr(utils.eval.precision, "cpu_flags", lambda cpuinfo="": {"avx2"})  # no native bf16
    cpu = benchmark.unique_settings(["fp32", "recommended"], torch.device("cpu"))
    assert [(s.amp, s.channels_last) for s in cpu] == [(None, False)]
    monkeypatch.setattr(utils.eval.precision, "cpu_flags", lambda cpuinfo="": {"avx512f", "amx_bf16"})
    amx = benchmark.unique_settings(["fp32", "recommended"], torch.device("cpu"))
    assert [(s.amp, s.channels_last) for s in amx] == [(None, False), ("bf16", True)]
    cuda = benchmark.unique_settings(["fp32", "recommended"], torch.device("cuda"))
    assert [(s.amp, s.channels_last) for s in cuda] == [(None, False), ("bf16", True)]


def test_bad_arguments_are_one_line_errors(capsys):
    assert benchmark.main(["--models", "Nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --models Nope") and "\n" not in err
    assert benchmark.main(["--published", "/nonexistent"]) == 2
    assert "not a checkout" in capsys.readouterr().err
    assert benchmark.main(["--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_time_calls_counts_only_timed_iterations():
    calls = []
    times = benchmark.time_calls(calls.append, warmup=2, iters=3, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)


def test_synthetic_batch_is_a_rainy_pair():
    rain, clean, query, query_clean = benchmark.synthetic_batch(2, 16, torch.Generator().manual_seed(0))
    for t in (rain, clean, query, query_clean):
        assert t.shape == (2, 3, 16, 16) and 0 <= float(t.min()) and float(t.max()) <= 1
    assert bool((rain >= clean - 1e-6).all()) and float((rain - clean).abs().sum()) > 0


def test_rounds_take_the_median_and_keep_errors():
    rounds = [{"stage1_img_s": 1.0, "peak_mib": 10, "skipped_steps": 0, "note": "a"},
              {"stage1_img_s": 3.0, "peak_mib": 30, "skipped_steps": 2, "note": "b"},
              {"stage1_img_s": 2.0, "peak_mib": 20, "skipped_steps": 0, "note": "c"}]
    assert benchmark.median_result(rounds) == {"stage1_img_s": 2.0, "peak_mib": 20, "skipped_steps": 2,
                                               "note": "a"}
    assert benchmark.median_result(rounds + [{"error": "boom"}]) == {"error": "boom"}


def test_concurrent_runs_ours_and_published_at_the_same_time(tmp_path, tiny_demo, monkeypatch):
    import threading
    import time

    (tmp_path / "published" / "models").mkdir(parents=True)
    spans, lock = {}, threading.Lock()
    result = {"stage1_img_s": 1.0, "coic_img_s": 0.5, "peak_mib": 1.0, "infer_normal_ms": 1.0,
              "infer_coic_ms": 1.0}

    def fake(name):
        def run(*args, **kwargs):
            start = time.monotonic()
            time.sleep(0.3)
            with lock:
                spans.setdefault(name, []).append((start, time.monotonic()))
            return dict(result)
        return run

    monkeypatch.setattr(benchmark, "run_worker", fake("ours"))
    monkeypatch.setattr(benchmark, "run_published", fake("published"))
    out = tmp_path / "results"
    assert benchmark.main(["--models", "BRN", "--small", "--device", "cpu", "--rounds", "2", "--concurrent",
                           "--published", str(tmp_path / "published"), "--save_path", str(out),
                           "--data_dir", os.path.join(tiny_demo, "light", "train")]) == 0
    assert len(spans["ours"]) == len(spans["published"]) == 2
    for (a0, a1), (b0, b1) in zip(spans["ours"], spans["published"]):
        assert a0 < b1 and b0 < a1  # the two overlapped in time
    text = (out / "benchmark.md").read_text()
    assert "--concurrent" in text and "median of 2 rounds" in text
