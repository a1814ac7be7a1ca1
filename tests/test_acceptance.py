"""``python -m benchmarks.acceptance``: the GPU acceptance sequence, run here as its CPU dry run."""
import json

import pytest

from benchmarks import acceptance
from models import available_models


@pytest.mark.slow  # end to end, 15-55 s: `pytest -m ""` and CI run it
def test_dry_run_runs_the_whole_sequence_and_reports(tmp_path):
    out = tmp_path / "report"
    # The benchmark step for one backbone keeps the suite short (``--tiny`` runs every backbone in
    # benchmarks' own smoke run); the CUDA-marked tests run in full. A generous test timeout: the
    # suite may share its cores.
    assert acceptance.main(["--dry_run", "--save_path", str(out), "--models", "BRN", "--test_timeout", "1800"]) == 0
    report = json.loads((out / "acceptance.json").read_text())
    env = report["environment"]
    import torch

    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and env["date"][:2] == "20"
    assert set(env) >= {"device", "driver", "cuda", "cudnn", "gpus", "cpu"}
    # tests/test_cuda.py: every backbone in 3 precisions, the fused skip, 2 sync checks, compile, NCCL/gloo
    assert report["tests"]["counts"] == {"passed": 3 * len(available_models()) + 5, "failed": 0, "skipped": 0}
    assert [r["backbone"] for r in report["benchmark"]["rows"]] == ["BRN"]
    for row in report["benchmark"]["rows"]:
        assert row["ours_coic_img_s"] > 0 and row["ours_infer_coic_ms"] > 0, row
    md = (out / "acceptance.md").read_text()
    assert md.startswith("# GPU acceptance (dry run on the CPU, tiny sizes)")
    assert f"torch {torch.__version__}" in md and "| BRN | fp32 = recommended |" in md


def test_targets_against_hand_made_rows():
    rows = [{"backbone": "A", "setting": "fp32", "speedup_coic": 1.1, "ours_infer_normal_ms": 10.0,
             "published_infer_normal_ms": 12.0, "ours_infer_coic_ms": 10.0, "published_infer_coic_ms": 20.0,
             "ours_peak_mib": 90.0, "published_peak_mib": 100.0},
            {"backbone": "A", "setting": "recommended (bf16 + channels_last)", "speedup_coic": 2.4,
             "ours_infer_normal_ms": 5.0, "published_infer_normal_ms": 12.0, "ours_infer_coic_ms": 10.0,
             "published_infer_coic_ms": 20.0, "ours_peak_mib": 110.0, "published_peak_mib": 100.0}]
    (t,) = acceptance.check_targets(rows)
    assert t["coic_speedup_recommended"] == 2.4 and t["coic_speedup_fp32"] == 1.1
    assert (t["infer_speedup_normal"], t["infer_speedup_coic"]) == (12.0 / 5.0, 2.0)
    assert t["peak_ratio"] == 1.1
    assert t["met"] == {"coic_recommended": True, "coic_fp32": True, "inference": True, "peak": False}
    rows[1]["published_infer_coic_ms"] = 14.0  # CoIC inference 1.4x: below 1.5
    assert acceptance.check_targets(rows)[0]["met"]["inference"] is False


def test_failed_tests_fail_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(acceptance, "run_tests", lambda device, timeout: {
        "returncode": 1, "seconds": 1.0, "counts": {"passed": 1, "failed": 1, "skipped": 0},
        "failed": ["tests.test_cuda::test_x"], "tail": "boom"})
    monkeypatch.setattr(acceptance, "run_benchmark", lambda args, data: {"returncode": 0, "rows": [], "header": ""})
    assert acceptance.main(["--dry_run", "--save_path", str(tmp_path)]) == 1
    md = (tmp_path / "acceptance.md").read_text()
    assert "- `tests.test_cuda::test_x`" in md and "boom" in md


def test_without_cuda_the_gpu_run_says_what_to_do(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the host's GPU, if any, is not the input
    assert acceptance.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device here") and "--dry_run" in err and "\n" not in err
