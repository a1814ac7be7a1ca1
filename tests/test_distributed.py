"""Two CPU processes with gloo, as torchrun would launch them: ranks stay in sync and resume."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import make_trainer, train_flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, flags: list, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from utils.train.config import parse_train_args
    from utils.train.distributed import shutdown
    from utils.train.trainer import Trainer

    trainer = Trainer(parse_train_args("BRN", flags))
    trainer.train()
    # Parameters must agree on every rank; batch-norm statistics are rank 0's in checkpoints
    # (DDP broadcasts them at each forward) unless --sync_bn (GPUs only) makes them global.
    state = {"model": dict(trainer.model.named_parameters()), "encoder": dict(trainer.encoder.named_parameters()),
             "archive": [t.clone() for t in trainer.archive.layers], "iteration": trainer.iteration}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown(trainer.dist)


def _run(flags, out_dir):
    mp.spawn(_worker, args=(2, _free_port(), flags, out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.slow  # end to end, 15-55 s: `pytest -m ""` and CI run it
def test_two_gloo_processes_stay_in_sync_and_resume(tmp_path, tiny_demo):
    data = os.path.join(tiny_demo, "heavy", "train") + "," + os.path.join(tiny_demo, "hazy", "train")
    save = str(tmp_path / "run")
    ranks = _run(train_flags(save, data, tot_iters=4, stage1_iters=2, save_freq=2), str(tmp_path))
    a, b = ranks
    assert a["iteration"] == b["iteration"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["encoder"]:  # query encoder (gradients) and key encoder (momentum copy of it)
        assert torch.equal(a["encoder"][key], b["encoder"][key]), key
    # BRN's published pool is the current batch: both ranks' rain layers, gathered, the same on each rank.
    assert len(a["archive"]) == 1 and torch.equal(a["archive"][0], b["archive"][0])
    assert a["archive"][0].shape[0] == 2 * 2  # two ranks' batches of 2
    assert a["archive"][0].shape[0] == 4  # both ranks' rain layers (batch 2 each) in one archive entry
    ckpts = sorted(os.listdir(save))
    assert "ckpt_0000004.pth" in ckpts
    saved = torch.load(os.path.join(save, "ckpt_0000004.pth"), weights_only=True)
    assert all(torch.equal(saved["model"][k], a["model"][k]) for k in a["model"])
    # the same command with more iterations resumes from iteration 4 on both ranks
    resumed = _run(train_flags(save, data, tot_iters=6, stage1_iters=2, save_freq=2), str(tmp_path))
    assert resumed[0]["iteration"] == resumed[1]["iteration"] == 6
    assert all(torch.equal(resumed[0]["model"][k], resumed[1]["model"][k]) for k in a["model"])


@pytest.mark.slow  # end to end, 15-55 s: `pytest -m ""` and CI run it
def test_bf16_autocast_matches_fp32(tmp_path, tiny_demo):
    """bf16 training reaches the fp32 PSNR within 0.3 dB after the same iterations."""
    from datasets import find_pairs
    from test_model import evaluate, load_model

    data = os.path.join(tiny_demo, "heavy", "train")
    scores = {}
    for amp in ("off", "bf16"):
        last = make_trainer(tmp_path / amp, data, extra=["--amp", amp], tot_iters=30, stage1_iters=15,
                            save_freq=30).train()
        model, _ = load_model("BRN", last, "normal", torch.device("cpu"))
        rows = evaluate(model, None, find_pairs(os.path.join(tiny_demo, "heavy", "test")), None,
                        torch.device("cpu"), progress=False)
        scores[amp] = sum(r["psnr"] for r in rows) / len(rows)
    assert scores["off"] > 10 and abs(scores["bf16"] - scores["off"]) < 0.3, scores
