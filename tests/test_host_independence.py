"""The benchmark and acceptance paths under both answers of the bf16 detection, whatever the host.

conftest.py makes the whole suite see a CPU without native bf16 (``$COIC_CPU_FLAGS``); here each test
states the CPU it runs as, and what follows from it is written out by hand.
"""
import json
import os

import pytest
import torch
from helpers import NATIVE_BF16_FLAGS, NO_NATIVE_BF16_FLAGS

from benchmarks import acceptance, benchmark
from utils.eval.precision import cpu_flags, native_bf16, recommended_setting

CPUS = {"no native bf16": NO_NATIVE_BF16_FLAGS, "native bf16": NATIVE_BF16_FLAGS}
# On each CPU: the benchmark's settings, as its table labels them (fp32 always; the recommended one is
# a row of its own only where it differs from fp32).
SETTINGS = {"no native bf16": ["fp32 = recommended"], "native bf16": ["fp32", "recommended (bf16 + channels_last)"]}


@pytest.fixture(params=list(CPUS))
def cpu(request, monkeypatch) -> str:
    monkeypatch.setenv("COIC_CPU_FLAGS", CPUS[request.param])  # this process and every command it starts
    return request.param


# The end-to-end runs below take 10-15 s each on a native-bf16 CPU: that side runs with the slow tests
# (`pytest -m ""`, CI); the default `pytest` keeps the other side.
BOTH_CPUS_ONE_SLOW = pytest.mark.parametrize(
    "cpu", ["no native bf16", pytest.param("native bf16", marks=pytest.mark.slow)], indirect=True)


def test_the_detection_reads_the_stated_flags(cpu):
    assert cpu_flags() == set(CPUS[cpu].split())
    assert native_bf16() is (cpu == "native bf16")
    setting = recommended_setting(torch.device("cpu"))
    assert setting.label == {"no native bf16": "fp32", "native bf16": "bf16 + channels_last"}[cpu]


def test_without_the_variable_the_detection_reads_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delenv("COIC_CPU_FLAGS")
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu avx512_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx512_bf16"}  # an explicit file is read as it is
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(info) as f:
        line = next((ln for ln in f if ln.startswith("flags")), "flags\t:\n")
    assert cpu_flags() == set(line.split(":", 1)[1].split()) or not os.path.exists("/proc/cpuinfo")


@BOTH_CPUS_ONE_SLOW
def test_benchmark_rows_follow_the_cpu(cpu, tmp_path, tiny_demo):
    out = tmp_path / "results"
    assert benchmark.main(["--models", "BRN", "--small", "--batch_size", "1", "--crop_size", "16",
                           "--infer_size", "16", "--iters", "1", "--warmup", "0", "--threads", "1",
                           "--device", "cpu", "--data_dir", os.path.join(tiny_demo, "light", "train"),
                           "--save_path", str(out)]) == 0
    rows = [ln for ln in (out / "benchmark.md").read_text().splitlines() if ln.startswith("| BRN |")]
    assert [r.split(" | ")[1] for r in rows] == SETTINGS[cpu]


def test_concurrent_spans_follow_the_cpu(cpu, tmp_path, tiny_demo, monkeypatch):
    (tmp_path / "published" / "models").mkdir(parents=True)
    calls = []
    result = {"stage1_img_s": 1.0, "coic_img_s": 0.5, "peak_mib": 1.0, "infer_normal_ms": 1.0, "infer_coic_ms": 1.0}
    monkeypatch.setattr(benchmark, "run_worker", lambda *a, **k: (calls.append("ours"), dict(result))[1])
    monkeypatch.setattr(benchmark, "run_published", lambda *a, **k: (calls.append("published"), dict(result))[1])
    assert benchmark.main(["--models", "BRN", "--small", "--device", "cpu", "--rounds", "2", "--concurrent",
                           "--published", str(tmp_path / "published"), "--save_path", str(tmp_path / "out"),
                           "--data_dir", os.path.join(tiny_demo, "light", "train")]) == 0
    # 2 rounds per setting for ours; the published code has no bf16 path, so it runs in fp32 only
    assert (calls.count("ours"), calls.count("published")) == (2 * len(SETTINGS[cpu]), 2)


@BOTH_CPUS_ONE_SLOW
def test_acceptance_dry_run_follows_the_cpu(cpu, tmp_path, monkeypatch):
    """The acceptance report's benchmark rows (its CUDA-marked tests do not depend on the CPU flags and
    run in full in tests/test_acceptance.py; here they are a canned pass)."""
    monkeypatch.setattr(acceptance, "run_tests", lambda device, timeout: {
        "returncode": 0, "seconds": 1.0, "counts": {"passed": 1, "failed": 0, "skipped": 0}, "failed": [],
        "tail": ""})
    out = tmp_path / "report"
    assert acceptance.main(["--dry_run", "--save_path", str(out), "--models", "BRN"]) == 0
    report = json.loads((out / "acceptance.json").read_text())
    rows = report["benchmark"]["rows"]
    assert [r["backbone"] for r in rows] == ["BRN"] * len(SETTINGS[cpu])
    labels = [r["setting"] for r in rows]
    assert labels == {"no native bf16": ["fp32 = recommended"],
                      "native bf16": ["fp32", "recommended (bf16 + channels_last)"]}[cpu], labels
    md = (out / "acceptance.md").read_text()
    assert all(f"| BRN | {label} |" in md for label in labels)
