import os

import pytest
import torch
from helpers import make_trainer

from utils.train.config import parse_train_args
from utils.train.trainer import list_checkpoints


def test_reference_defaults_and_paper_flags():
    args = parse_train_args("BRN", ["--model_name", "BRN", "--use_GPU", "--gpu_id", "0",
                                    "--contra_loss_weight", "0.0", "--stage1_iters", "40000000",
                                    "--data_paths", "a,b"])
    assert (args.batch_size, args.crop_size, args.lr, args.tot_iters) == (12, 100, 1e-3, 260000)
    assert args.milestone == [30, 50, 80] and args.model_hparams == {"inter_iter": 8, "dim_in": 128}
    assert args.save_path == "checkpoints/BRN_128d_0.0contra"
    defaults = parse_train_args("BRN", [])
    assert (defaults.stage1_iters, defaults.contra_loss_weight, defaults.temperature, defaults.n_neg) == \
        (40000, 0.2, 1.0, 4)
    with pytest.raises(SystemExit):
        parse_train_args("BRN", ["--model_name", "RCDNet"])


def test_stage_switch(tmp_path, tiny_demo, monkeypatch):
    data = os.path.join(tiny_demo, "heavy", "train")
    trainer = make_trainer(tmp_path, data, tot_iters=4, stage1_iters=2)
    seen = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, z=None: (seen.append(z is not None), forward(x, z))[1])
    contrast_calls = []
    contrast = trainer.encoder.contrast
    monkeypatch.setattr(trainer.encoder, "contrast", lambda *a, **k: (contrast_calls.append(1), contrast(*a, **k))[1])
    gen = [p for p in trainer.model.parameters() if p in set(trainer.coic_params)][0]
    before = gen.detach().clone()
    trainer.train()
    assert seen == [False, False, True, True]
    assert len(contrast_calls) == 2
    assert not torch.equal(before, gen.detach())  # generators trained in stage 2
    assert len(trainer.archive.layers) == 1  # BRN's published pool (the default exemplars): the current batch


def test_resume_equals_uninterrupted(tmp_path, tiny_demo):
    # 8 pairs, batch 2: 4 iterations per epoch; stopping at 3 crosses the stage switch (3) and
    # the epoch boundary (4) after the resume.
    data = os.path.join(tiny_demo, "multiangle", "train")
    full = make_trainer(tmp_path / "full", data, tot_iters=6, stage1_iters=3)
    full.train()
    part = make_trainer(tmp_path / "part", data, tot_iters=3, stage1_iters=3, save_freq=100)
    part.train()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "part"))] == ["ckpt_0000000.pth", "ckpt_0000003.pth"]
    resumed = make_trainer(tmp_path / "part", data, tot_iters=6, stage1_iters=3)
    assert resumed.iteration == 3
    resumed.train()
    assert resumed.iteration == full.iteration == 6 and resumed.epoch == full.epoch == 1
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        assert torch.equal(a, b)
    for opt_a, opt_b in ((full.base_opt, resumed.base_opt), (full.coic_opt, resumed.coic_opt)):
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"])
    assert full.schedulers[0].state_dict() == resumed.schedulers[0].state_dict()


def test_keeps_last_checkpoints_and_refuses_other_backbone_settings(tmp_path, tiny_demo):
    data = os.path.join(tiny_demo, "hazy", "train")
    trainer = make_trainer(tmp_path, data, tot_iters=6, stage1_iters=6, save_freq=1, keep_checkpoints=2)
    trainer.train()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt_0000005.pth", "ckpt_0000006.pth"]
    from utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="use another --save_path"):
        make_trainer(tmp_path, data, tot_iters=8, inter_iter=2)


def test_unwritable_save_path(tmp_path, tiny_demo):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="--save_path"):
        make_trainer(blocker / "sub", os.path.join(tiny_demo, "hazy", "train"))


def test_checkpoint_from_before_the_coic_rename_resumes(tmp_path, tiny_demo):
    # Checkpoints written before the tran_* -> coic_* rename hold the CoIC optimizer as "tran_optim".
    data = os.path.join(tiny_demo, "heavy", "train")
    trainer = make_trainer(tmp_path, data, tot_iters=3, stage1_iters=1, save_freq=100)
    last = trainer.train()
    state = torch.load(last, weights_only=True)
    state["tran_optim"] = state.pop("coic_optim")
    torch.save(state, last)
    resumed = make_trainer(tmp_path, data, tot_iters=3, stage1_iters=1)
    assert resumed.iteration == 3
    saved = state["tran_optim"]["state"]
    for i, values in resumed.coic_opt.state_dict()["state"].items():
        assert torch.equal(values["exp_avg"], saved[i]["exp_avg"])
