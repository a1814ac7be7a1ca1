"""ONNX export (``utils.eval.export``, ``export.py``): onnxruntime gives what ``restore`` gives.

For every registered backbone, plain and with the CoIC encoder inside the graph, one export
runs at two image sizes (H and W are dynamic): onnxruntime's output equals the PyTorch fp32
``restore(model, rain, image_code(encoder, rain))`` within 1e-4. A tiled backbone (IDT) is
checked at one tile and at several. The command line's user errors are one line each.

Each export costs 20-35 s of CPU (torch.export and its decompositions, whatever the model's size): the
plain ``pytest`` exports BRN with its encoder (the deploy path: a recurrent backbone and the encoder in
one graph); the other backbones and the plain graphs are marked ``slow``, and CI runs them.
"""
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort  # a requirement: never skipped
import pytest
import torch
from contract import tiny_model
from helpers import ROOT, scramble_coic

from models import available_models, build_encoder, tile_size
from utils.checkpoint import save_atomic
from utils.eval.inference import image_code, restore

TOLERANCE = 1e-4  # max abs difference, images in [0,1]


def _sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Two (H, W) no backbone's multiple divides; for a tiled backbone one tile and two by two tiles."""
    tile = tile_size(model)
    return [(24, 28), (40, 36)] if tile is None else [(24, 28), (tile + 8, tile + 28)]


def _case(name: str, coic: bool):
    """(model, encoder or None): the tiny backbone with strong random CoIC weights and a random encoder,
    or the plain backbone as a checkpoint without CoIC builds it (``dim_in=0``)."""
    if not coic:
        return tiny_model(name, dim_in=0).eval(), None
    model = tiny_model(name).eval()
    scramble_coic(model, std=0.3)  # the default init barely modulates: parity must see z
    torch.manual_seed(5)
    return model, build_encoder().eval()


def _max_diffs(path: str, model, encoder) -> list[float]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for k, (h, w) in enumerate(_sizes(model)):
        rain = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(10 + k))
        z = image_code(encoder, rain) if encoder is not None else None
        expected = restore(model, rain, z).numpy()
        (derained,) = session.run(None, {"rain": rain.numpy()})
        assert derained.shape == expected.shape
        diffs.append(float(np.abs(derained - expected).max()))
    return diffs


EXPORTS = [pytest.param(name, coic, id=f"{name}-{'coic' if coic else 'plain'}",
                        marks=() if (name, coic) == ("BRN", True) else pytest.mark.slow)
           for name in available_models() for coic in (False, True)]


@pytest.mark.parametrize("name,coic", EXPORTS)
def test_onnxruntime_matches_restore(name, coic, tmp_path):
    from utils.eval.export import export_onnx

    model, encoder = _case(name, coic)
    path = str(tmp_path / f"{name}.onnx")
    export_onnx(model, encoder, path, optimize=False)
    diffs = _max_diffs(path, model, encoder)
    assert max(diffs) <= TOLERANCE, f"{name} {'coic' if coic else 'plain'}: max abs {diffs}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(scope="module")
def brn_checkpoint(tmp_path_factory):
    """A CoIC BRN checkpoint in our layout (backbone, its hyper-parameters, the encoder)."""
    model = tiny_model("BRN")
    path = str(tmp_path_factory.mktemp("ckpt") / "brn.pth")
    save_atomic({"model_name": "BRN", "model": model.state_dict(), "model_hparams": {"inter_iter": 1},
                 "encoder": build_encoder().state_dict()}, path)
    return path


def test_cli_unknown_name(tmp_path):
    _one_line_error(_cli("--test_model", "coic-nosuch", "--save_path", str(tmp_path / "m.onnx")), "coic-nosuch")


def test_cli_checkpoint_of_another_backbone(brn_checkpoint, tmp_path):
    result = _cli("--test_model", brn_checkpoint, "--model_name", "RCDNet", "--save_path", str(tmp_path / "m.onnx"))
    _one_line_error(result, brn_checkpoint, "--model_name")


def test_cli_unwritable_out(brn_checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line_error(_cli("--test_model", brn_checkpoint, "--save_path", str(blocker / "m.onnx")), "--save_path")
