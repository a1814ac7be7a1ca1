"""Loading a checkpoint never runs its code: the safe unpickler everywhere, one line for a refused
file, and ``--trust_checkpoint`` as the loud, explicit opt-out.

The payload files are real pickles whose ``__reduce__`` names ``os.system``; the marker file the payload
would write must not appear. ``test_model.py`` runs as a command line in a subprocess; the training
commands run their ``main`` in this process (tests/test_robustness.py and tests/test_errors.py start
``train_BRN.py`` itself), where a payload that ran would touch the marker just the same.
"""
from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, make_trainer, train_flags

from models import build_model
from utils.checkpoint import CheckpointError, UnsafeCheckpointError, load_weights, read_checkpoint, trusted_checkpoints


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a crafted ``.pth`` does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(path: str, marker: str, wrap=lambda payload: {"model": payload}) -> str:
    torch.save(wrap(_Payload(marker)), path)
    return path


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _train(flags: list[str], capsys) -> subprocess.CompletedProcess:
    """``python train_BRN.py FLAGS`` run through its ``main`` in this process, as a finished command."""
    from utils.train.run import main

    capsys.readouterr()
    code = main("BRN", flags)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["train_BRN.py", *flags], code, out, err)


def _assert_refused_in_one_line(done: subprocess.CompletedProcess, path: str, marker: str) -> None:
    assert not os.path.exists(marker), "the checkpoint's code ran"
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert path in errors[0] and "beyond tensors" in errors[0] and "--trust_checkpoint" in errors[0], errors[0]
    assert "posix.system" in errors[0] or "os.system" in errors[0], errors[0]  # names what it refused


def test_test_model_refuses_a_malicious_checkpoint(tmp_path):
    path = plant_payload(str(tmp_path / "shared_model.pth"), str(tmp_path / "pwned"))
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photos / "rainy.png")
    done = _run([os.path.join(ROOT, "test_model.py"), "--model_name", "BRN", "--test_model", path,
                 "--test_dir", str(photos), "--save_path", str(tmp_path / "out"), "--device", "cpu"], str(tmp_path))
    _assert_refused_in_one_line(done, path, str(tmp_path / "pwned"))


def test_resume_refuses_a_planted_newest_checkpoint(tmp_path, tiny_demo, capsys):
    """A planted ``ckpt_*.pth`` newer than the run's own is refused, not skipped for an older one."""
    save = tmp_path / "run"
    save.mkdir()
    data = os.path.join(tiny_demo, "heavy", "train")
    path = plant_payload(str(save / "ckpt_9999999.pth"), str(tmp_path / "pwned"), wrap=lambda p: {"iteration": p})
    done = _train([*train_flags(str(save), data), "--device", "cpu"], capsys)
    _assert_refused_in_one_line(done, path, str(tmp_path / "pwned"))


def test_pretrained_refuses_a_malicious_checkpoint(tmp_path, tiny_demo, capsys):
    path = plant_payload(str(tmp_path / "forum_model.pth"), str(tmp_path / "pwned"))
    data = os.path.join(tiny_demo, "heavy", "train")
    done = _train([*train_flags(str(tmp_path / "run"), data), "--pretrained", path, "--device", "cpu"], capsys)
    _assert_refused_in_one_line(done, path, str(tmp_path / "pwned"))


def test_the_safe_loader_refuses_in_process_too(tmp_path):
    path = plant_payload(str(tmp_path / "enc.pth"), str(tmp_path / "pwned"), wrap=lambda p: [p])
    with pytest.raises(UnsafeCheckpointError, match="beyond tensors"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(build_model("BRN", inter_iter=1, dim_in=8), path)
    assert not os.path.exists(tmp_path / "pwned")


def _old_format_checkpoint(model: torch.nn.Module) -> dict:
    """What this project's training checkpoints held before the safe loader (the format of today's
    save before this change): the NumPy random state as the array ``np.random.get_state()`` returns,
    optimizer and scheduler states, and the flags, built here rather than committed as a binary."""
    import random

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 50])
    return {"model_name": "BRN", "model_hparams": {"inter_iter": 1, "dim_in": 8}, "model": model.state_dict(),
            "base_optim": opt.state_dict(), "schedulers": [sched.state_dict()], "iteration": 7,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": None, "generator": torch.Generator().get_state()},
            "args": {"milestone": [30, 50, 80], "amp": "off", "pretrained": None, "lr": 1e-3}}


def test_checkpoints_of_earlier_versions_load_safely(tmp_path):
    model = build_model("BRN", inter_iter=1, dim_in=8)
    old = _old_format_checkpoint(model)
    path = str(tmp_path / "ckpt_0000007.pth")
    torch.save(old, path)
    got = read_checkpoint(path)  # safe loader, no opt-out
    assert got["iteration"] == 7 and got["args"] == old["args"]
    state = got["rng"]["numpy"]
    assert state[0] == "MT19937" and np.array_equal(state[1], old["rng"]["numpy"][1])
    assert got["rng"]["python"] == old["rng"]["python"]
    for key, value in old["model"].items():
        assert torch.equal(got["model"][key], value)
    fresh = build_model("BRN", inter_iter=1, dim_in=8)
    load_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_the_numpy_state_round_trips_through_todays_format():
    from utils.rng import rng_state, set_rng_state

    np.random.seed(123)
    np.random.rand(5)
    gen = torch.Generator().manual_seed(1)
    saved = rng_state(gen)
    assert isinstance(saved["numpy"][1], torch.Tensor)  # no NumPy object in what is saved
    expected = np.random.rand(4)
    np.random.seed(0)
    set_rng_state(saved, gen)
    assert np.array_equal(np.random.rand(4), expected)


def test_todays_training_checkpoint_resumes_through_the_safe_loader(tmp_path, tiny_demo, monkeypatch):
    """The Trainer's own checkpoint needs no allow-list: it holds tensors, numbers, strings and containers."""
    from utils.train.trainer import list_checkpoints

    data = os.path.join(tiny_demo, "heavy", "train")
    make_trainer(tmp_path, data, tot_iters=2, stage1_iters=1).train()
    newest = list_checkpoints(str(tmp_path))[-1]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(newest) == []
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(k.get("weights_only")), real(*a, **k))[1])
    resumed = make_trainer(tmp_path, data, tot_iters=2, stage1_iters=1)
    assert resumed.iteration == 2 and calls and all(c is True for c in calls)


class _Note(collections.namedtuple("_Note", "text")):
    """A benign object beyond tensors (what a colleague's script may have pickled)."""


def test_the_opt_out_loads_a_benign_object_and_warns(tmp_path, caplog):
    path = str(tmp_path / "colleague.pth")
    torch.save({"note": _Note("hello"), "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"), trusted_checkpoints(True):
        got = read_checkpoint(path)
    assert got["note"].text == "hello"
    assert any(path in r.getMessage() and "--trust_checkpoint" in r.getMessage() for r in caplog.records)
    with pytest.raises(UnsafeCheckpointError):  # the opt-out ends with its command
        read_checkpoint(path)


def test_garbage_is_unreadable_not_unsafe(tmp_path):
    path = tmp_path / "half.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert not isinstance(info.value, UnsafeCheckpointError) and "truncated" in str(info.value)
