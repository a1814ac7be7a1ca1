"""The error boundary (utils.errors), the atomic write (utils.io) and the failures users meet."""
import errno
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
from helpers import ROOT, train_flags

import test_model
from utils import checkpoint
from utils.checkpoint import save_atomic
from utils.errors import UserError, cli_main, one_line
from utils.io import atomic_path, atomic_write, atomic_write_text
from utils.train.run import main as train_main
from utils.train.trainer import list_checkpoints


def _err_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]


def test_user_error_is_one_line_and_exit_2(capsys):
    def work():
        raise UserError("bad flag\n  try --other")

    assert cli_main(work) == 2
    assert _err_lines(capsys) == ["error: bad flag try --other"]


def test_user_facing_os_error_is_one_line(capsys):
    def work():
        raise OSError(errno.ENOSPC, "No space left on device")

    assert cli_main(work) == 2
    assert _err_lines(capsys) == ["error: [Errno 28] No space left on device"]


def test_bug_keeps_its_exception(capsys):
    def bug():
        raise ValueError("a bug, not a user mistake")

    with pytest.raises(ValueError, match="a bug"):
        cli_main(bug)
    with pytest.raises(OSError):  # an OS error the user cannot fix (I/O error) is not hidden either
        cli_main(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    assert capsys.readouterr().err == ""


def test_bug_prints_its_traceback_from_a_command_line():
    code = ("import sys; from utils.errors import cli_main\n"
            "def bug():\n    raise ValueError('a real bug')\n"
            "sys.exit(cli_main(bug))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode not in (0, 2)
    assert "Traceback" in done.stderr and "ValueError: a real bug" in done.stderr


def test_keyboard_interrupt(capsys):
    def work():
        raise KeyboardInterrupt

    assert cli_main(work, interrupted="stopped here") == 130
    assert _err_lines(capsys) == ["stopped here"]


def test_extra_user_error_types(capsys):
    class ToolError(Exception):
        pass

    def work():
        raise ToolError("wrong --x")

    assert cli_main(work, also=(ToolError,)) == 2
    assert _err_lines(capsys) == ["error: wrong --x"]


def test_one_line_strips_a_dataloader_traceback():
    wrapped = ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\nDataError: pair sizes differ: a vs b")
    assert one_line(wrapped) == "pair sizes differ: a vs b"


def test_atomic_write_replaces_or_keeps(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic_write_text(target, "one\n")
    assert target.read_text() == "one\n"

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "one\n"
    assert os.listdir(target.parent) == ["table.csv"]  # no temporary file left
    with atomic_path(tmp_path / "pic.png") as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").close()
    assert (tmp_path / "pic.png").exists()


def test_save_atomic_keeps_a_serializer_bug(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a serializer bug")))
    with pytest.raises(RuntimeError, match="serializer bug"):  # not a refused write: not hidden
        save_atomic({"a": 1}, tmp_path / "ckpt.pth")
    assert os.listdir(tmp_path) == []


def _train_under_file_size_limit(save: str, data: str, tot_iters: int, limit: Optional[int]):
    import resource

    def limited() -> None:  # the path a full disk or a quota takes: the kernel refuses the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    flags = train_flags(save, data, tot_iters=tot_iters, save_freq=2, image_freq=100, log_freq=100)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_BRN.py"), *flags, "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited if limit else None)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_a_checkpoint_write_over_the_file_size_limit_is_one_line(tmp_path, tiny_demo):
    """torch's writer reports the refused write as ``unexpected pos ...``; the user reads one line."""
    data = os.path.join(tiny_demo, "light", "train")
    save = str(tmp_path / "run")
    # the first two iterations in this process (the same command's main); the limited run needs its own
    flags = train_flags(save, data, tot_iters=2, save_freq=2, image_freq=100, log_freq=100)
    assert train_main("BRN", [*flags, "--device", "cpu"]) == 0
    before = sorted(os.listdir(save))
    size = os.path.getsize(list_checkpoints(save)[-1])
    done = _train_under_file_size_limit(save, data, 4, size // 2)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write checkpoint " + save), errors
    assert "File too large" in errors[0] and "--save_path" in errors[0] and "ulimit" in errors[0]
    assert sorted(f for f in os.listdir(save) if f.endswith(".pth") or f.startswith(".")) == \
        [f for f in before if f.endswith(".pth") or f.startswith(".")]  # old checkpoints stay, no temporary file
    rerun = _train_under_file_size_limit(save, data, 4, None)
    assert rerun.returncode == 0 and "resumed from" in rerun.stderr and "iteration 2" in rerun.stderr
    assert os.path.basename(list_checkpoints(save)[-1]) == "ckpt_0000004.pth"


def test_enospc_during_training_checkpoint_is_one_line(tmp_path, tiny_demo, monkeypatch, capsys):
    data = os.path.join(tiny_demo, "light", "train")
    assert train_main("BRN", train_flags(str(tmp_path), data, tot_iters=2, save_freq=2)) == 0
    before = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth") or f.startswith("."))
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a file is half there when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    capsys.readouterr()
    code = train_main("BRN", train_flags(str(tmp_path), data, tot_iters=4, save_freq=2))
    err = _err_lines(capsys)
    assert code == 2 and err[-1].startswith("error: cannot write checkpoint") and "No space left" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert "ckpt_0000002.pth" in [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth") or f.startswith(".")) == before  # the earlier checkpoints stay, no temporary file is left


@pytest.mark.parametrize("tile", ["0", "-8"])
def test_tile_must_be_positive(tile, tmp_path, tiny_demo, capsys):
    code = test_model.main(["--test_model", str(tmp_path / "unused.pth"), "--tile", tile,
                            "--test_dir", os.path.join(tiny_demo, "heavy", "test"), "--save_path", str(tmp_path)])
    err = _err_lines(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tile") and tile in err[0]


def test_bad_backbone_settings_in_training_are_one_line(tmp_path, tiny_demo, capsys):
    # a user mistake inside the model's constructor: a --rain_kernel file that is not there
    data = os.path.join(tiny_demo, "heavy", "train")
    flags = train_flags(str(tmp_path / "run"), data) + ["--rain_kernel", str(tmp_path / "missing.mat")]
    assert train_main("RCDNet", flags) == 2
    err = capsys.readouterr().err
    assert "error: rain kernel file not found" in err and "Traceback" not in err


def test_sync_bn_on_the_cpu_is_one_line_before_the_data_is_read(tmp_path, capsys):
    # the data folder does not exist: the flag is refused first
    assert train_main("BRN", ["--sync_bn", "--data_paths", str(tmp_path / "nowhere"), "--save_path",
                              str(tmp_path / "run")]) == 2
    assert "--sync_bn works with CUDA devices only" in capsys.readouterr().err
