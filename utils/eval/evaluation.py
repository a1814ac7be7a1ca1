"""Evaluating a checkpoint: building model and encoder from any file we accept, the inputs of a
test folder or named test set, the derain-save-score loop. ``test_model.py`` is its command line;
the demo report (``utils.train.run``) and the analysis tools use it too. Result tables: ``utils.eval.results``.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from models import build_encoder, build_model, model_class
from utils.checkpoint import CheckpointError, load_weights, read_checkpoint, remap_published_keys
from utils.data.layouts import claims_pairs, find_images, find_pairs
from utils.data.specs import dataset_spec, find_dataset_folder, split_folder
from utils.errors import DataError, UserError, one_line
from utils.eval.inference import compile_for_inference, image_code, restore
from utils.eval.results import read_table, write_table
from utils.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    is_image,
    list_images,
    read_image,
    read_pair,
    save_image,
)
from utils.metrics import METRICS, score
from utils.niqe import NIQEUndefined, niqe

logger = logging.getLogger("coic.test")

__all__ = ["load_model", "encoder_dim", "encoder_from_checkpoint", "load_encoder", "collect_inputs", "collect_test_inputs",
           "collect_testset", "output_name", "evaluate"]

DEFAULT_ENCODER_DIM = 128  # the paper's z


# --------------------------------------------------------------------------- model and encoder
def _has_generators(state: dict) -> bool:
    return any(".generator." in k or ".g2pa_wgen." in k for k in state)


def load_model(model_name: str, path: str, mode: str, device: torch.device,
               overrides: Optional[dict] = None) -> tuple[nn.Module, dict]:
    """Build ``model_name`` to fit the checkpoint at ``path`` and load it (eval mode).

    Our checkpoints carry their hyper-parameters; published state_dicts use the reference
    configuration. A state_dict without CoI-M generators (a backbone trained without CoIC in
    its original layout) builds the plain backbone.
    """
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt.get("model_hparams", {})) if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and ckpt.get("model_name") not in (None, model_name):
        raise CheckpointError(f"{path} is a {ckpt['model_name']} checkpoint, not {model_name}; fix --model_name")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(state, dict) and not _has_generators(state):
        if mode == "tran":
            raise CheckpointError(f"{path} has no CoI-M generators (trained without CoIC); use --load_mode normal")
        hparams["dim_in"] = 0
    infer = getattr(model_class(model_name), "hparams_from_state", None)
    if callable(infer) and isinstance(state, dict):  # what the weights show of settings the file does not record
        for key, value in infer(remap_published_keys(state)).items():
            hparams.setdefault(key, value)
    hparams.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        model = build_model(model_name, **hparams)
    except ValueError as exc:  # hyper-parameters the checkpoint or a flag gave
        raise CheckpointError(f"cannot build {model_name} for {path}: {exc}") from None
    load_weights(model, state)
    return model.to(device).eval(), ckpt


def encoder_dim(ckpt: Any) -> int:
    """z's dimension of the encoder in ``ckpt``: its saved ``encoder_hparams``, else read off the last
    MLP layer (published MoCo files carry no hyper-parameters), else the paper's 128."""
    if isinstance(ckpt, dict) and ckpt.get("encoder_hparams", {}).get("dim"):
        return int(ckpt["encoder_hparams"]["dim"])
    state = ckpt.get("encoder", ckpt) if isinstance(ckpt, dict) else {}
    for key, value in remap_published_keys(state if isinstance(state, dict) else {}).items():
        if key.endswith("mlp.2.weight") and hasattr(value, "shape"):
            return int(value.shape[0])
    return DEFAULT_ENCODER_DIM


def encoder_from_checkpoint(ckpt: Any, device: torch.device) -> nn.Module:
    """The ContrastiveEncoder held by ``ckpt`` (ours: its ``encoder`` part; a published MoCo
    state_dict), sized by ``encoder_dim``, in eval mode on ``device``."""
    encoder = build_encoder(dim=encoder_dim(ckpt))
    load_weights(encoder, ckpt, part="encoder")
    return encoder.to(device).eval()


def load_encoder(path: Optional[str], model_ckpt: dict, model_path: str, device: torch.device) -> nn.Module:
    """The encoder of ``--feat_ext`` (``path``), else the one inside the model checkpoint."""
    if path is None:
        if not (isinstance(model_ckpt, dict) and "encoder" in model_ckpt):
            raise CheckpointError(f"--load_mode tran needs an encoder: {model_path} holds none; pass --feat_ext")
        return encoder_from_checkpoint(model_ckpt, device)
    return encoder_from_checkpoint(read_checkpoint(path), device)


# --------------------------------------------------------------------------- inputs
def collect_inputs(test_dir: str, stacked_rain_half: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
    """(rainy path, clean path or None) for a test folder: scored pairs, or rainy images only.

    A folder that holds any layout's marker (``utils.data.layouts.LAYOUTS``) is paired; a folder of
    side-by-side images is paired when ``stacked_rain_half`` names its rainy half; otherwise
    the images of ``utils.data.layouts.find_images`` are derained without ground truth.
    """
    if os.path.isfile(test_dir):
        if not is_image(os.path.basename(test_dir)):
            raise DataError(f"--test_dir {test_dir} is a file but not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [(test_dir, None)]
    if not os.path.isdir(test_dir):
        raise DataError(f"--test_dir {test_dir} does not exist")
    stacked = stacked_rain_half and not os.path.isdir(os.path.join(test_dir, "rain")) and list_images(test_dir)
    if claims_pairs(test_dir) or stacked:
        return list(find_pairs(test_dir, stacked_rain_half))
    _, images = find_images(test_dir)
    if not images:
        raise DataError(f"--test_dir {test_dir} holds no images (and no rain/ + norain/ folders)")
    return [(path, None) for path in images]


def collect_test_inputs(entries: Sequence[str]) -> tuple[str, list[tuple[str, Optional[str]]]]:
    """(label, items) of ``--test_dir``'s entries: one folder (``collect_inputs``), or any mix of
    photos, folders and glob patterns (``'photos/*.jpg'``), in the order given."""
    if len(entries) == 1 and not glob.has_magic(entries[0]):
        return entries[0], collect_inputs(entries[0])
    items: list[tuple[str, Optional[str]]] = []
    for entry in entries:
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) and not os.path.exists(entry) else [entry]
        if not matches:
            raise DataError(f"--test_dir {entry} matches no file")
        for path in matches:
            if os.path.isdir(path) or not glob.has_magic(entry):
                items.extend(collect_inputs(path))
            elif is_image(os.path.basename(path)):
                items.append((path, None))
    if not items:
        raise DataError(f"--test_dir {' '.join(entries)} holds no images")
    seen: dict[str, str] = {}
    for rain, _ in items:
        other = seen.setdefault(output_name(rain), str(rain))
        if other != str(rain):
            raise DataError(f"--test_dir: {other} and {rain} would both be saved as {output_name(rain)}; "
                            "derain them in separate runs (another --save_path)")
    label = " ".join(entries) if len(entries) <= 3 else f"{len(entries)} inputs ({entries[0]}, ...)"
    return label, items


def collect_testset(name: str, data_root: str) -> tuple[str, str, list[tuple[str, Optional[str]]]]:
    """(canonical name, test folder, items) of a named test set under ``data_root``: a dataset of
    ``utils.data.specs``, or any other ``data_root/<name>/test`` folder (e.g. the demo's rain types)."""
    try:
        spec = dataset_spec(name)
    except DataError:
        own = os.path.join(data_root, name, "test")
        if not os.path.isdir(own):
            raise
        return name, own, collect_inputs(own)
    folder = find_dataset_folder(data_root, spec)
    if folder is None:
        raise DataError(f"--testset {name}: no {' or '.join(spec.folders)} folder in --data_root {data_root}")
    test_dir = split_folder(folder, spec, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"--testset {name}: test folder {test_dir} does not exist")
    if not spec.ground_truth:
        image_dir, images = find_images(test_dir)
        if not images:
            raise DataError(f"--testset {name}: {test_dir} holds no images")
        return spec.name, image_dir, [(path, None) for path in images]
    return spec.name, test_dir, collect_inputs(test_dir, spec.stacked_rain_half)


def output_name(rain_path: str) -> str:
    """File name of the derained image of ``rain_path``: its stem as PNG."""
    return os.path.splitext(os.path.basename(rain_path))[0] + ".png"


def _read_item(rain_path: str, clean_path: Optional[str],
               max_memory: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if clean_path is not None:
        return read_pair(rain_path, clean_path, max_memory=max_memory)
    return read_image(rain_path, max_memory=max_memory), None


@torch.inference_mode()
def evaluate(model: nn.Module, encoder: Optional[nn.Module], items: list, save_path: Optional[str],
             device: torch.device, tile: Optional[int] = None, overlap: int = 32,
             progress: bool = True, protocol: str = "coic", skip_existing: bool = False,
             table_path: Optional[str] = None, desc: str = "test", amp: Optional[torch.dtype] = None,
             memory_format: torch.memory_format = torch.contiguous_format, metrics: Optional[Sequence[str]] = None,
             niqe_channel: str = "y", max_memory: Optional[int] = None, strict: bool = True,
             compile_model: bool = False) -> list[dict]:
    """Derain each (rain, clean or None) item, save it under ``save_path`` and score it.

    ``metrics``: names of ``utils.metrics.METRICS``; PSNR/SSIM are computed where there is a
    clean image, NIQE (``niqe_rain`` of the input, ``niqe_out`` of the output) for every item.
    None: PSNR and SSIM where there is ground truth, NIQE where there is none.

    The next image is decoded and the previous PNGs are encoded in a background thread while
    the model runs, so at most a few images are in memory. ``amp``: autocast dtype of the
    model and encoder (scores are computed on the float32 output). ``skip_existing``: an item
    whose PNG already exists is not derained again; its scores come from the rows of
    ``table_path`` scored with the same protocol, else from the saved PNG. ``table_path`` is
    also rewritten (atomically) every 50 images, so an interrupted run loses little.
    ``max_memory`` (bytes; only without ``tile``): each image is restored whole or in the tiles
    that ``utils.eval.memory.MemoryPlanner`` fits into that budget; an image whose header claims
    more than the budget is unreadable, refused before it is decoded, and one whose smallest plan does
    not fit is refused before its forward (``ImageOverBudgetError``). ``strict``: such an image stops
    the run (``UnreadableImageError``); otherwise its row gets an ``error`` (the reason), it
    is left out of the scores, and the other images are derained. ``compile_model``: the backbone
    runs compiled (``utils.eval.inference.compile_for_inference``); the memory planner measures the
    eager model, which needs more memory, so its plans stay safe.
    """
    from utils.eval.memory import ImageOverBudgetError, MemoryPlanner

    planner = (MemoryPlanner(model, device, max_memory, overlap, amp, memory_format)
               if max_memory is not None and tile is None else None)
    net = compile_for_inference(model) if compile_model else model
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    previous = read_table(table_path) if (skip_existing and table_path) else {}
    out_paths = [os.path.join(save_path, output_name(r)) if save_path else None for r, _ in items]
    todo = [i for i, out in enumerate(out_paths) if not (skip_existing and out and os.path.isfile(out))]
    next_todo = dict(zip(todo, todo[1:]))
    rows, skipped, rescored, undefined = [], 0, 0, []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="coic-io") as io_pool:
        reads = {i: io_pool.submit(_read_item, *items[i], max_memory) for i in todo[:1]}
        writes: deque = deque()
        for k, (rain_path, clean_path) in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress,
                                                         dynamic_ncols=True)):
            name, out_path = output_name(rain_path), out_paths[k]
            row = {"name": name, "psnr": None, "ssim": None, "niqe_rain": None, "niqe_out": None,
                   "protocol": protocol, "niqe_channel": niqe_channel}
            wanted = _wanted(metrics, clean_path is not None)
            if k not in reads:
                skipped += 1
                old = previous.get(name) or {}
                if old.get("protocol") == protocol:  # PSNR/SSIM on record for this protocol
                    row["psnr"], row["ssim"] = old.get("psnr"), old.get("ssim")
                if old.get("niqe_channel", "y") == niqe_channel:
                    row["niqe_rain"], row["niqe_out"] = old.get("niqe_rain"), old.get("niqe_out")
                if any(row[key] is None for key in _keys(wanted)):  # score the saved 8-bit PNG
                    rescored += 1
                    x = read_image(rain_path) if "niqe" in wanted else None  # the input is only needed for NIQE
                    clean = read_image(clean_path) if clean_path is not None else None
                    _score(row, wanted, x, read_image(out_path), clean, protocol, niqe_channel, undefined,
                           (out_path, clean_path))
            else:
                pending = reads.pop(k)
                following = next_todo.get(k)
                if following is not None:  # decode the next image while this one is derained
                    reads[following] = io_pool.submit(_read_item, *items[following], max_memory)
                try:
                    x, clean = pending.result()
                except UnreadableImageError as exc:
                    if strict:
                        raise
                    logger.warning("%s", exc)
                    rows.append({**row, "error": one_line(exc)})
                    continue
                xb = x.unsqueeze(0).to(device).contiguous(memory_format=memory_format)
                try:
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        z = image_code(encoder, xb) if encoder is not None else None
                        y = restore(net, xb, z, tile=tile, overlap=overlap, planner=planner, scored=bool(wanted),
                                    progress=progress)
                except ImageOverBudgetError as exc:  # this image only: the others may fit
                    if strict:
                        raise UserError(f"{rain_path}: {exc}") from None
                    logger.warning("%s: %s", rain_path, exc)
                    rows.append({**row, "error": f"{rain_path}: {one_line(exc)}"})
                    continue
                y = y[0].float().cpu()
                _score(row, wanted, x, y, clean, protocol, niqe_channel, undefined, (rain_path, clean_path))
                if out_path:
                    writes.append(io_pool.submit(save_image, y, out_path))
                while writes and (writes[0].done() or len(writes) > 2):
                    writes.popleft().result()  # a failed write stops the run here
            rows.append(row)
            if table_path and len(rows) % 50 == 0:
                # keep the earlier run's rows not reached yet, so an interruption loses no score
                done = {r["name"] for r in rows}
                write_table(rows + [r for n, r in previous.items() if n not in done], table_path)
        while writes:
            writes.popleft().result()
    if skipped:
        logger.info("%s: %d images already derained, skipped (%d re-scored from their saved PNGs)", desc, skipped,
                    rescored)
    if undefined:
        logger.warning("%s: %d NIQE scores are undefined and left empty, e.g. %s", desc, len(undefined), undefined[0])
    if table_path:
        write_table(rows, table_path)
    return rows


SCORE_KEYS = ("psnr", "ssim", "niqe_rain", "niqe_out")


def _wanted(metrics: Optional[Sequence[str]], has_clean: bool) -> set[str]:
    """The metrics an item gets: those asked for that it can have (default: by reference, else NIQE)."""
    if metrics is None:
        return {"psnr", "ssim"} if has_clean else {"niqe"}
    return {m for m in metrics if has_clean or not METRICS[m].needs_reference}


def _keys(wanted: set[str]) -> list[str]:
    return [k for k in SCORE_KEYS if k in wanted or (k.startswith("niqe") and "niqe" in wanted)]


def _score(row: dict, wanted: set[str], x: Optional[torch.Tensor], y: torch.Tensor, clean: Optional[torch.Tensor],
           protocol: str, channel: str, undefined: list, paths: tuple) -> None:
    """Fill ``row``'s missing scores among ``wanted`` for output y of input x (clean: ground truth)."""
    if clean is not None and ("psnr" in wanted or "ssim" in wanted) and row["psnr"] is None:
        _check_sizes(y, clean, *paths)
        row["psnr"], row["ssim"] = score(y, clean, protocol)
    if "niqe" in wanted and (row["niqe_rain"] is None or row["niqe_out"] is None):
        for key, image in (("niqe_rain", x), ("niqe_out", y)):
            try:
                row[key] = niqe(image, channel)
            except NIQEUndefined as exc:  # too small or flat: an empty cell, reported once per set
                undefined.append(f"{row['name']} ({'rainy' if key == 'niqe_rain' else 'derained'}): {exc}")


def _check_sizes(y: torch.Tensor, clean: torch.Tensor, rain_path: str, clean_path: str) -> None:
    if clean.shape != y.shape:
        raise DataError(f"pair sizes differ: {rain_path} gives {tuple(y.shape[1:])}, "
                        f"{clean_path} is {tuple(clean.shape[1:])}")
