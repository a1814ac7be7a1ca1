"""A sixth backbone is its model file, its registry entry and its ``train_<name>.py``, nothing else.

A toy backbone is registered at run time the way the real ones are: one ``models.Backbone`` in
``models.BACKBONES``, which carries its training settings, its costliest convolution and its docs
line. The contract checks, the Trainer in both stages, evaluation through ``test_model``, the
benchmarks (the roofline's convolution check included), the tools' model lists, the docs' tables and,
when it declares them, the published names all take it with no other edit. Data the paper's
backbones alone have (the published files, the published code's adapter) fails loudly, naming its
file, for a backbone that declares it without the data. The last test greps the code for a
backbone's name: it appears in that backbone's own files only.
"""
import ast
import dataclasses
import os
import re

import contract
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import ROOT, make_trainer

import models
import test_model
from models.coim import ModulatedConv2d, ModulatedConvTranspose2d
from utils.train import backbone_tables, recipes


class ToyNet(nn.Module):
    """Residual deraining with one stride-2 level. forward(x, z=None): (B,3,H,W) in [0,1] -> same shape."""

    size_multiple = 2  # one 2x down-sampling
    tile_size = None

    def __init__(self, width: int = 16, dim_in: int = 128):
        super().__init__()
        self.head = ModulatedConv2d(3, width, 3, padding=1, dim_in=dim_in)
        self.down = ModulatedConv2d(width, width, 3, stride=2, padding=1, dim_in=dim_in)
        self.mix = ModulatedConv2d(width, width, 1, padding=0, dim_in=dim_in)  # 1x1: never modulated
        self.up = ModulatedConvTranspose2d(width, 3, 2, stride=2, padding=0, dim_in=dim_in)

    def forward(self, x: torch.Tensor, z=None) -> torch.Tensor:
        f = F.relu(self.down(F.relu(self.head(x, z)), z))
        return x + self.up(F.relu(self.mix(f, z)), z)


# Everything the rest of the code knows of the toy: its registry entry.
TOY = models.Backbone(
    "Toy", f"{__name__}:ToyNet", "a residual toy", "Nobody et al., 2026",
    models.Training(batch_size=4, crop_size=32, lr=1e-3, tot_iters=1000, stage1_iters=500, contra_loss_weight=0.2,
                    loss="L1Loss", schedule=models.MultiStep("milestone", 0.5),
                    flags={"width": models.Flag(int, 16, "channels of the features"),
                           "milestone": models.Flag(int, [2, 3], "epochs of the rate's steps", model=False,
                                                    nargs="+")},
                    tiny=dict(width=4, batch_size=2, crop_size=16)),
    models.ConvShape(16, 16, 3, stride=2),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(models.BACKBONES, "Toy", TOY)
    return "Toy"


def test_contract_checks_take_the_toy(toy):
    assert toy in models.available_models()
    assert contract.tiny_model(toy).up.in_channels == 4  # the recipe's tiny width
    contract.check_contract(toy)


def test_train_both_stages_then_evaluate(toy, tmp_path, tiny_demo):
    save = str(tmp_path / "run")
    trainer = make_trainer(save, os.path.join(tiny_demo, "heavy", "train"), toy, tot_iters=4, stage1_iters=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    generators = [p.clone() for p in trainer.coic_params]
    last = trainer.train()
    assert trainer.iteration == 4 and os.path.isfile(last)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert any(not torch.equal(g, p) for g, p in zip(generators, trainer.coic_params))  # the CoIC stage ran
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["model_name"] == toy and state["model_hparams"] == {"width": 4, "dim_in": 128}

    test_dir = os.path.join(tiny_demo, "heavy", "test")
    for mode in ("normal", "tran"):
        out = str(tmp_path / mode)
        assert test_model.main(["--test_model", last, "--model_name", toy, "--load_mode", mode,
                                "--test_dir", test_dir, "--save_path", out]) == 0
        assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 4


def test_benchmark_lists_and_measures_the_toy(toy, tmp_path, tiny_demo, monkeypatch):
    from benchmarks import benchmark, timing

    assert toy in benchmark.build_parser().parse_args([]).models
    data = os.path.join(tiny_demo, "light", "train")
    # Workers are fresh processes that do not see a run-time registration: measure in this one.
    monkeypatch.setattr(benchmark, "run_worker", lambda script, payload, cwd, timeout:
                        timing.measure_ours(timing.Case(**payload)))
    (tmp_path / "published" / "models").mkdir(parents=True)
    out = tmp_path / "results"
    assert benchmark.main(["--models", toy, "--tiny", "--iters", "1", "--warmup", "0", "--infer_size", "20",
                           "--threads", "1", "--device", "cpu", "--data_dir", data, "--save_path", str(out),
                           "--published", str(tmp_path / "published")]) == 0
    rows = [ln for ln in (out / "benchmark.md").read_text().splitlines() if ln.startswith("| Toy ")]
    assert len(rows) == 1
    row = rows[0]
    assert row.startswith("| Toy | fp32 = recommended | 2 | 16 | 20 |")  # the recipe's tiny batch and crop
    assert "no published counterpart of Toy" in row and "timed for ours only" in row


# --------------------------------------------------------------------------- every list is the registry's
def test_every_list_of_backbones_takes_the_toy(toy):
    from analysis import model_cost
    from benchmarks import benchmark, inference, large_photo

    assert models.MODELS[toy] == TOY.target and list(models.MODELS) == models.available_models()
    assert models.model_class(toy) is ToyNet and models.backbone(toy) is TOY
    assert (models.size_multiple(ToyNet), models.tile_size(ToyNet)) == (2, None)
    recipe = recipes.get_recipe(toy)
    assert (recipe.model_name, recipe.batch_size, recipe.crop_size, recipe.lr, recipe.tot_iters, recipe.seed,
            recipe.scheduler_unit) == ("Toy", 4, 32, 1e-3, 1000, 0, "epoch")
    assert toy in recipes.RECIPES and list(recipes.RECIPES) == models.available_models()
    for tool in (benchmark, inference, large_photo, model_cost):
        assert tool.build_parser().parse_args([]).models == models.available_models(), tool.__name__
    assert inference.check_size(toy) == 64  # no tile of its own: the default check input


def test_a_declared_tile_is_what_the_inference_benchmark_compares_on(toy, monkeypatch):
    from benchmarks import inference

    monkeypatch.setattr(ToyNet, "tile_size", 32)
    assert inference.check_size(toy) == 32


def test_published_weights_the_toy_declares_are_published_names(toy, monkeypatch):
    from models import pretrained
    monkeypatch.setitem(models.BACKBONES, toy, dataclasses.replace(TOY, published_weights=("toy-weights",)))
    with pytest.raises(models.RegistryError, match=r"toy-weights \(Toy\).*models/pretrained.py"):
        pretrained.published_names()  # declared, but no files: never a silently missing name
    entry = pretrained.PublishedModel("toy-weights", toy, "normal", "nothing", "a toy",
                                      pretrained.PublishedFile("checkpoints/Baseline/toy_model.pth", "0" * 40))
    monkeypatch.setitem(pretrained.PUBLISHED_MODELS, "toy-weights", entry)
    assert pretrained.published_names()[-1] == "toy-weights"
    assert "toy-weights" in test_model.build_parser().format_help()
    assert pretrained.choose_checkpoint("toy-weights", None, None).model_name == toy
    assert "toy-weights" in pretrained.describe_published()


def test_published_weights_of_no_registered_backbone_are_an_error(monkeypatch):
    from models import pretrained
    entry = pretrained.PublishedModel("ghost-weights", "Ghost", "normal", "nothing", "unregistered",
                                      pretrained.PublishedFile("checkpoints/Baseline/ghost_model.pth", "0" * 40))
    monkeypatch.setitem(pretrained.PUBLISHED_MODELS, "ghost-weights", entry)
    with pytest.raises(models.RegistryError, match=r"ghost-weights \(Ghost\).*models/__init__.py"):
        pretrained.published_names()


def test_published_code_is_declared_by_the_registry_and_adapted_by_the_benchmark(toy, monkeypatch):
    from benchmarks import published

    assert published.counterparts(models.available_models()) == {
        n: b.published_code for n, b in models.BACKBONES.items() if n != toy}  # the toy declares none
    monkeypatch.setitem(models.BACKBONES, toy, dataclasses.replace(TOY, published_code="models.Toy_CoIM:Toy"))
    with pytest.raises(models.RegistryError, match="Toy.*benchmarks/published.py"):
        published.counterparts([toy])  # declared, but nothing to run it with
    monkeypatch.setitem(published.PUBLISHED, toy, published.PUBLISHED["BRN"])
    assert published.counterparts([toy]) == {toy: "models.Toy_CoIM:Toy"}
    monkeypatch.setitem(published.PUBLISHED, "Ghost", published.PUBLISHED["BRN"])
    with pytest.raises(models.RegistryError, match="Ghost.*models/__init__.py"):
        published.counterparts([toy])  # an adapter of no registered backbone


def test_the_roofline_times_the_convolution_the_toy_declares(toy, tmp_path):
    from benchmarks import inference, roofline

    assert roofline.CONV_SHAPES[toy] == (16, 16, 3, 2, 1) and list(roofline.CONV_SHAPES) == models.available_models()
    (row,) = roofline.conv_check(size=12, rounds=1, threads=1, names=[toy])
    assert row["backbone"] == toy and row["shape"] == "16->16, 3x3, groups 1, 12x12"
    assert row["plain_ms"] > 0 and row["modulated_ms"] > 0
    args = inference.build_parser().parse_args(["--models", toy, "--device", "cpu", "--save_path", str(tmp_path)])
    assert args.conv_size > 0 and inference._check(args).type == "cpu"  # nothing to add for its conv check
    (tmp_path / "published" / "models").mkdir(parents=True)
    args.published = str(tmp_path / "published")
    with pytest.raises(inference.InferenceBenchError, match="published counterpart.*Toy"):
        inference._check(args)


def test_the_docs_tables_take_the_toy_from_its_entry(toy):
    assert backbone_tables.readme_table()[-1] == "| Toy | a residual toy (Nobody et al., 2026) | `train_Toy.py` | — |"
    assert backbone_tables.recipe_table()[-1] == (
        "| Toy | `--width 16 --milestone 2 3` | `L1Loss`: mean \\|x - y\\| | Adam 1e-3, ×0.5 at epochs 2/3 | 4 / 32 | 1k | "
        "0.2 |")
    # The pages are regenerated, not edited: until then the check names both.
    assert backbone_tables.stale_pages() == ["README.md (backbones)", os.path.join("docs", "training.md") + " (recipes)"]


def test_training_settings_that_name_nothing_say_where_to_look(toy, monkeypatch):
    monkeypatch.setitem(models.BACKBONES, toy, dataclasses.replace(
        TOY, training=dataclasses.replace(TOY.training, loss="NoSuchLoss")))
    with pytest.raises(ValueError, match="'NoSuchLoss' in losses.py"):
        recipes.get_recipe(toy)
    monkeypatch.setitem(models.BACKBONES, toy, dataclasses.replace(
        TOY, training=dataclasses.replace(TOY.training, optimizer="sgd")))
    with pytest.raises(ValueError, match="Toy: unknown optimizer 'sgd' in models/__init__.py"):
        recipes.get_recipe(toy)
    with pytest.raises(ValueError, match="'Ghost'.*models/__init__.py"):
        recipes.get_recipe("Ghost")


# --------------------------------------------------------------------------- the files a backbone touches
# DGUNet stands for any backbone: it has no role of its own (not the default, no published weights,
# no tiles), so wherever the code names it, a sixth backbone would need a line too. Names in prose
# (docstrings, comments, the docs outside their generated tables) are not code and are not counted.
PROBE = "DGUNet"
PROBE_FILES = {"models/__init__.py", "models/dgunet.py", "train_DGUNet.py"}
# Data only the paper's backbones have, which a new backbone declares or not: the adapter that runs
# the authors' code (``Backbone.published_code``) and the paper's experiments (``reproduce.py``).
PAPER_ONLY = {"benchmarks/published.py", "utils/paper/experiments.py"}
CODE_DIRS = ("models", "utils", "analysis", "benchmarks")


def _code_files() -> list[str]:
    """Every Python file of the project outside tests/ (the root's scripts and the library folders)."""
    found = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    for folder in CODE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            found += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
                      for f in filenames if f.endswith(".py")]
    return sorted(found)


def _names_in_code(source: str, name: str) -> bool:
    """Whether a string constant of ``source`` other than a docstring names ``name`` as a word."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    word = re.compile(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])")
    return any(isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
               and word.search(node.value) for node in ast.walk(tree))


def test_a_backbone_is_named_in_its_own_files_only():
    """What a sixth backbone touches: models/<name>.py, its entry in models/__init__.py, train_<name>.py
    (and its own tests/test_<name>.py); the docs' tables are regenerated from the registry."""
    naming = {f for f in _code_files() if _names_in_code(open(os.path.join(ROOT, f), encoding="utf-8").read(), PROBE)}
    assert PROBE_FILES <= naming, "the scan misses the backbone's own files"
    outside = sorted(naming - PROBE_FILES - PAPER_ONLY)
    assert outside == [], f"{PROBE} is named in code in {outside}: read it from its registry entry instead"
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert PROBE not in text  # the package's description lists no backbone


def test_the_scan_sees_a_name_in_code_but_not_in_prose():
    source = '''"""DGUNet in a docstring."""
# DGUNet in a comment
def f():
    """DGUNet again."""
    return {"x": 1}
'''
    assert not _names_in_code(source, PROBE)
    assert _names_in_code(source + "SHAPES = {'DGUNet': 1}\n", PROBE)
    assert _names_in_code(source + "x = f'train_DGUNet.py'\n", PROBE)
    assert not _names_in_code(source + "x = 'DGUNets2'\n", PROBE)  # another word


@pytest.mark.parametrize("name", models.available_models())
def test_every_backbone_has_its_own_files(name):
    module = models.BACKBONES[name].target.split(":")[0]
    assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py")
    script = open(os.path.join(ROOT, f"train_{name}.py"), encoding="utf-8").read()
    assert f'main("{name}")' in script  # the thin script: the shared flags, this backbone's recipe, the Trainer
    assert os.path.isfile(os.path.join(ROOT, "tests", f"test_{module.split('.')[-1]}.py"))
