"""Every backbone trains through its own train script (both stages) and evaluates with test_model."""
import os

import pytest
import torch

import test_model
from losses import EdgeLoss, RCDNetStageLoss
from models import BACKBONES, available_models, build_model
from utils.train.config import parse_train_args
from utils.train.recipes import RECIPES
from utils.train.run import main
from utils.train.schedulers import CyclicCosineRestart


@pytest.mark.parametrize("name", available_models())
def test_train_script_two_iterations_then_evaluate(name, tmp_path, tiny_demo, monkeypatch, capsys):
    save = str(tmp_path / "run")
    data = os.path.join(tiny_demo, "heavy", "train")
    # --tiny: the recipe's smallest model, batch and crop (the same code paths in seconds).
    flags = ["--model_name", name, "--data_paths", data, "--save_path", save, "--tot_iters", "2",
             "--stage1_iters", "1", "--num_workers", "0", "--save_freq", "1", "--log_freq", "1", "--n_neg", "1",
             "--tiny"]
    assert main(name, flags) == 0
    ckpt = os.path.join(save, "ckpt_0000002.pth")
    assert os.path.isfile(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["model_name"] == name and state["iteration"] == 2
    test_dir = os.path.join(tiny_demo, "heavy", "test")
    for mode in ("normal", "tran"):
        out = str(tmp_path / mode)
        assert test_model.main(["--test_model", ckpt, "--model_name", name, "--load_mode", mode,
                                "--test_dir", test_dir, "--save_path", out]) == 0
        assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 4


def test_paper_commands_parse_with_reference_defaults():
    paths = "datasets/Rain200H/train,datasets/Rain200L/train,datasets/Rain800/train,datasets/DID/train," \
            "datasets/DDN/train,datasets/spa"
    for name in available_models():
        for weight, stage1 in (("0.0", "40000000"), ("0.2", "40000")):
            args = parse_train_args(name, ["--model_name", name, "--use_GPU", "--gpu_id", "0",
                                           "--contra_loss_weight", weight, "--stage1_iters", stage1,
                                           "--data_paths", paths])
            assert args.contra_loss_weight == float(weight) and args.stage1_iters == int(stage1)
    rcd = parse_train_args("RCDNet", [])
    assert (rcd.batch_size, rcd.crop_size, rcd.contra_loss_weight, rcd.milestone) == (16, 64, 50.0, [25, 50, 75])
    assert rcd.model_hparams == {"num_map": 32, "num_channel": 32, "num_block": 4, "inter_iter": 17, "dim_in": 128,
                                 "rain_kernels": "shared"}
    assert parse_train_args("DGUNet", []).seed == 1234
    idt = parse_train_args("IDT", ["--crop_size", "64"])
    assert idt.model_hparams["img_size"] == 64 and idt.milestone == [100, 250, 350]
    drs = parse_train_args("DRSformer", [])
    assert (drs.batch_size, drs.lr, drs.seed) == (4, 3e-4, 100) and RECIPES["DRSformer"].grad_clip == 0.01


def test_rcdnet_stage_loss_formula():
    torch.manual_seed(0)
    model = build_model("RCDNet", inter_iter=2, num_block=1, num_map=4, num_channel=4)
    rain, clean = torch.rand(1, 3, 12, 12), torch.rand(1, 3, 12, 12)
    loss, out = RCDNetStageLoss()(model, rain, clean, None)
    s = model.forward_stages(rain)
    mse = torch.nn.functional.mse_loss
    c, r = clean * 255, (rain - clean) * 255
    expected = (0.1 * mse(s.b0, c) + 0.1 * (mse(s.backgrounds[0], c) + mse(s.backgrounds[1], c))
                + mse(s.backgrounds[2], c) + 0.1 * (mse(s.rain_layers[0], r) + mse(s.rain_layers[1], r))
                + 0.9 * mse(s.rain_layers[1], r))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out, model(rain))


def test_edge_loss_zero_for_equal_and_sees_edges():
    edge = EdgeLoss()
    x = torch.rand(1, 3, 16, 16)
    assert float(edge(x, x)) == pytest.approx(1e-3, abs=1e-6)  # Charbonnier floor ε
    flat = torch.full((1, 3, 16, 16), 0.5)
    # flat regions have no edges (the borders see the zero-inserted upsampling through the padding)
    assert float(edge.laplacian(flat)[..., 4:-4, 4:-4].abs().max()) < 1e-6
    assert float(edge(x, flat)) > float(edge(x, x))


def test_cyclic_cosine_restart_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = CyclicCosineRestart(opt, [4, 8], [3e-4, 1e-6])
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([3e-4] * 4)  # first cycle: eta_min == base
    assert lrs[4] == pytest.approx(3e-4)  # restart
    assert lrs[8] == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)  # half way through the second cycle
    assert lrs[12] == pytest.approx(1e-6) and lrs[13] == pytest.approx(1e-6)


def test_idt_tiles_any_image_size():
    from utils.eval.inference import restore

    torch.manual_seed(0)
    model = build_model("IDT", img_size=64, embed_dim=8).eval()
    for shape in ((1, 3, 100, 90), (1, 3, 40, 52)):
        x = torch.rand(*shape)
        y = restore(model, x, torch.nn.functional.normalize(torch.randn(1, 128), dim=1), overlap=16)
        assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", available_models())
def test_every_registered_backbone_has_a_recipe_that_builds(name):
    """The registry's plain data names real things: a loss of losses.py, an optimizer pair, a schedule
    whose milestone flag exists, flags that parse."""
    recipe, args = RECIPES[name], parse_train_args(name, [])
    assert recipe.model_name == name and list(RECIPES) == available_models()
    assert isinstance(recipe.make_loss(), torch.nn.Module)
    params = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    base, coic = recipe.make_optimizers(*params, args)
    if recipe.make_scheduler is not None:
        recipe.make_scheduler(base, args, 100)
    assert recipe.scheduler_unit in ("epoch", "iter") and recipe.rain_pool in ("batch", "archive")


# The backbones the authors published code for (the registry's ``published_code``): their recipes
# follow its train scripts.
WITH_PUBLISHED_SCRIPT = [name for name, b in BACKBONES.items() if b.published_code is not None]

# The published training scripts' settings (train_<Backbone>.py of the CoIC code), typed from them.
PUBLISHED = {
    #            batch crop  lr     iterations stage1  contra seed
    "BRN":       (12, 100, 1e-3, 260000, 40000, 0.2, 0),
    "RCDNet":    (16, 64, 1e-3, 260000, 40000, 50.0, 0),
    "DGUNet":    (16, 128, 2e-4, 400000, 40000, 0.2, 1234),
    "IDT":       (8, 128, 1e-4, 400000, 40000, 0.2, 0),
    "DRSformer": (4, 128, 3e-4, 400000, 40000, 0.2, 100),
}
MILESTONES = {"BRN": ([30, 50, 80], 0.2), "RCDNet": ([25, 50, 75], 0.2), "IDT": ([100, 250, 350], 0.1)}


def _published(table: dict, name: str, table_name: str):
    """``table[name]``; a backbone with published code but no row fails, naming the table to fill in."""
    if name not in table:
        pytest.fail(f"{name} declares published_code (models/__init__.py) but tests/test_recipes.py {table_name} "
                    f"has no row for it: type in the settings of its published train_{name}.py")
    return table[name]


def test_published_tables_are_of_backbones_with_published_code():
    assert sorted(PUBLISHED) == sorted(WITH_PUBLISHED_SCRIPT)
    assert set(MILESTONES) <= set(WITH_PUBLISHED_SCRIPT)


@pytest.mark.parametrize("name", WITH_PUBLISHED_SCRIPT)
def test_recipe_matches_the_published_script(name):
    import losses

    args = parse_train_args(name, [])
    batch, crop, lr, iters, stage1, contra, seed = _published(PUBLISHED, name, "PUBLISHED")
    assert (args.batch_size, args.crop_size, args.lr, args.tot_iters, args.stage1_iters, args.contra_loss_weight,
            args.seed) == (batch, crop, lr, iters, stage1, contra, seed)
    recipe = RECIPES[name]
    assert recipe.explode_threshold == 10.0  # |output| > 10: DGUNet's reference guard, kept for all
    loss = recipe.make_loss()
    kind = {"BRN": losses.SSIMLoss, "IDT": losses.SSIMLoss, "DRSformer": losses.L1Loss}.get(name)
    if kind is not None:
        assert isinstance(loss, losses.ImageLoss) and isinstance(loss.criterion, kind)
    else:
        assert isinstance(loss, {"RCDNet": losses.RCDNetStageLoss, "DGUNet": losses.StageSumLoss}[name])
    w = [torch.nn.Parameter(torch.zeros(1))]
    base, coic = recipe.make_optimizers(w, [torch.nn.Parameter(torch.zeros(1))], args)
    assert base.defaults["lr"] == coic.defaults["lr"] == lr
    if name == "DRSformer":
        assert isinstance(base, torch.optim.AdamW) and base.defaults["weight_decay"] == 1e-4
        assert coic.defaults["weight_decay"] == 0.01 and recipe.grad_clip == 0.01
    else:
        assert type(base) is torch.optim.Adam and type(coic) is torch.optim.Adam and recipe.grad_clip is None


@pytest.mark.parametrize("name", [n for n in WITH_PUBLISHED_SCRIPT if "milestone" in RECIPES[n].flags])
def test_epoch_milestones_of_the_published_scripts(name):
    milestones, gamma = _published(MILESTONES, name, "MILESTONES")
    args = parse_train_args(name, [])
    assert args.milestone == milestones
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = RECIPES[name].make_scheduler(opt, args, 100)
    lrs = []
    for _ in range(milestones[-1] + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [gamma ** sum(e >= m for m in milestones) for e in range(milestones[-1] + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_dgunet_cosine_to_1e6_over_the_run_and_drsformer_restarts():
    import math

    args = parse_train_args("DGUNet", [])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = RECIPES["DGUNet"].make_scheduler(opt, args, 1000)  # 400 epochs + 1
    lrs = []
    for _ in range(402):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    t_max = 401
    for e in (0, 100, 200, 401):
        assert lrs[e] == pytest.approx(1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * e / t_max)) / 2, rel=1e-6)
    args = parse_train_args("DRSformer", [])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = RECIPES["DRSformer"].make_scheduler(opt, args, 1)
    assert (sched.periods, sched.eta_mins) == ([92000, 208000, 200000], [3e-4, 1e-4, 1e-6])
    assert RECIPES["DRSformer"].scheduler_unit == "iter" and RECIPES["BRN"].scheduler_unit == "epoch"
