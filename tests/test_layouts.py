"""Layouts as data (utils.data.layouts), the specs table beside them, the one square resize, the one code dimension."""
import os
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from PIL import Image

from models import build_encoder
from utils.data import layouts
from utils.data.layouts import LAYOUTS, FolderScan, Layout, detect_layout, find_images, scan_folder
from utils.data.specs import DATASET_SPECS
from utils.eval.evaluation import collect_inputs, encoder_dim, encoder_from_checkpoint
from utils.images import resize_square


def _png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def test_each_layout_is_detected_from_its_folders(tmp_path):
    for layout in LAYOUTS:
        folder = tmp_path / layout.name.replace("/", "_").replace(" ", "_")
        for d in layout.folders:
            os.makedirs(folder / d)
        assert detect_layout(str(folder)) is layout
        assert layout.claims(str(folder)) and layout.clean_dir(str(folder)) == str(folder / layout.clean)
    assert detect_layout(str(tmp_path)) is None


def test_a_new_layout_is_one_entry_for_training_and_evaluation(tmp_path, monkeypatch):
    def pair_input_target(folder):
        scan = FolderScan(folder, "input/target", clean_dir=os.path.join(folder, "target"))
        for name in sorted(os.listdir(os.path.join(folder, "input"))):
            scan.pairs.append((os.path.join(folder, "input", name), os.path.join(folder, "target", name)))
        return scan

    new = Layout("input/target", ("input", "target"), ("target",), "target", pair_input_target)
    monkeypatch.setattr(layouts, "LAYOUTS", LAYOUTS + (new,))
    for sub in ("input", "target"):
        _png(str(tmp_path / sub / "a.png"))
    assert scan_folder(str(tmp_path)).layout == "input/target"
    items = collect_inputs(str(tmp_path))
    assert items == [(str(tmp_path / "input" / "a.png"), str(tmp_path / "target" / "a.png"))]  # scored


def test_find_images_probes_the_image_folders_in_order(tmp_path):
    assert find_images(str(tmp_path)) == (str(tmp_path), [])
    _png(str(tmp_path / "Real_Internet" / "1.png"))
    assert find_images(str(tmp_path))[1] == [str(tmp_path / "Real_Internet" / "1.png")]
    _png(str(tmp_path / "rain" / "2.png"))
    assert find_images(str(tmp_path))[1] == [str(tmp_path / "rain" / "2.png")]
    _png(str(tmp_path / "3.png"))
    assert find_images(str(tmp_path)) == (str(tmp_path), [str(tmp_path / "3.png")])


def test_every_spec_rule_is_a_pairing_rule():
    assert all(s.rule in layouts.PAIRING_RULES for s in DATASET_SPECS if s.rule is not None)
    assert layouts.PAIRING_RULES[-1] is layouts.RULE_SAME  # the generic fallback is tried last


def test_resize_square_one_image_or_a_batch():
    x = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    reference = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    assert torch.equal(resize_square(x, 16), reference)
    assert torch.equal(resize_square(x[1], 16), reference[1])
    assert resize_square(x * 3, 8).max() <= 1


def test_encoder_dim_is_read_one_way():
    enc = build_encoder(dim=32)
    state = enc.state_dict()
    assert encoder_dim({"encoder": state, "encoder_hparams": {"dim": 32}}) == 32
    assert encoder_dim({"encoder": state}) == 32  # no hyper-parameters: read off the weights
    published = {f"encoder_q.{k}": v for k, v in state.items() if k.startswith("encoder_q.")} or state
    assert encoder_dim(published) == 32
    assert encoder_dim({}) == 128
    loaded = encoder_from_checkpoint({"encoder": state}, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values()))


def test_datasets_py_command_line_loads_the_module_once(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["datasets.py", "pairs", "/nonexistent"])
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "datasets.py"), run_name="__main__")
    assert done.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert "datasets" not in sys.modules
