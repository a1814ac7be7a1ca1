"""A sixth backbone needs a model class, a registry entry and a recipe, nothing else.

A toy backbone is registered at run time the way the real ones are (a ``models.Backbone`` in
``models.BACKBONES``, a ``utils.train.recipes.RECIPES`` entry); the contract checks, the Trainer in both
stages, evaluation through ``test_model``, the benchmarks' and tools' model lists and, when it
declares them, the published names all take it with no other edit. A file that keeps per-backbone
data of its own fails loudly, naming itself, for a backbone it has no entry for.
"""
import dataclasses
import os

import contract
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import make_trainer

import models
import test_model
from losses import L1Loss
from models.coim import ModulatedConv2d, ModulatedConvTranspose2d
from utils.train import recipes


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


TOY_RECIPE = recipes.Recipe(
    model_name="Toy", batch_size=4, crop_size=32, lr=1e-3, tot_iters=1000, stage1_iters=500,
    contra_loss_weight=0.2, make_loss=lambda: recipes.ImageLoss(L1Loss()),
    flags={"width": recipes.Flag(int, 16, "channels of the features")},
    tiny=dict(width=4, batch_size=2, crop_size=16),
)


TOY = models.Backbone("Toy", f"{__name__}:ToyNet")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(models.BACKBONES, "Toy", TOY)
    monkeypatch.setitem(recipes.RECIPES, "Toy", TOY_RECIPE)
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
    assert recipes.get_recipe(toy) is TOY_RECIPE
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


def test_data_the_inference_benchmark_keeps_per_backbone_is_asked_not_skipped(toy, tmp_path):
    from benchmarks import inference

    assert set(inference.CONV_SHAPES) == set(models.available_models()) - {toy}
    args = inference.build_parser().parse_args(["--models", toy, "--device", "cpu", "--save_path", str(tmp_path)])
    with pytest.raises(models.RegistryError, match="CONV_SHAPES has no shape for Toy"):
        inference._check(args)
    args.conv_size = 0
    assert inference._check(args).type == "cpu"
    (tmp_path / "published" / "models").mkdir(parents=True)
    args.published = str(tmp_path / "published")
    with pytest.raises(inference.InferenceBenchError, match="published counterpart.*Toy"):
        inference._check(args)


def test_a_registered_backbone_without_a_recipe_names_the_file_to_edit(monkeypatch):
    monkeypatch.setitem(models.BACKBONES, "Toy", TOY)
    with pytest.raises(ValueError, match="'Toy'.*utils/train/recipes.py"):
        recipes.get_recipe("Toy")
