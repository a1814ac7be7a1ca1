"""What the analysis tools share: devices, encoders, image lists, embeddings, atomic outputs.

Outputs are always written to a temporary file beside the target and renamed into place,
so an interrupted run never leaves a half-written table or figure behind.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils import tables
from utils.allocator import keep_freed_memory
from utils.checkpoint import read_checkpoint, trusted_checkpoints
from utils.data.layouts import find_pairs
from utils.errors import UserError, cli_main
from utils.eval.evaluation import encoder_from_checkpoint
from utils.eval.inference import ENCODER_SIZE
from utils.images import UnreadableImageError, is_image, read_image, resize_square
from utils.io import atomic_dir, atomic_path
from utils.cli import add_alias, add_device_args, add_list, split_list
from utils.train.distributed import resolve_device

logger = logging.getLogger("coic.analysis")

__all__ = [
    "AnalysisError", "add_output_args", "setup", "add_embedding_args", "split_paths",
    "dataset_labels", "check_labels", "dataset_images", "dataset_pairs", "sample", "resize_square", "checkpoint_meta",
    "load_encoder_file", "encode_batch", "encode_images", "gather_embeddings", "pearson", "atomic_path", "atomic_dir",
    "fmt", "write_csv", "write_text", "markdown_table", "new_figure", "require_matplotlib", "save_figure",
    "dataset_colours", "write_embeddings", "read_embeddings", "run_tool",
]

# Folder names that say nothing about which dataset a path is (used to build default labels).
_GENERIC_NAMES = {"train", "test", "val", "valid", "rain", "norain", "input", "target", "gt"}


class AnalysisError(UserError, ValueError):
    """Bad input to an analysis tool, phrased as what to do about it (printed as one line)."""


# ---------------------------------------------------------------------------- command line
def add_output_args(p: argparse.ArgumentParser, default_save: str) -> None:
    p.add_argument("--save_path", default=default_save, help="folder for the tables and figures")
    add_device_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; on a small, shared CPU 1 can be much faster)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load checkpoints that hold objects beyond tensors with the full unpickler, which runs any "
                        "code they name: only for files from a source you trust")


def add_restore_args(p, model_help: str = "backbone of checkpoints that do not name it (published files)") -> None:
    """Flags of the tools that derain images with a checkpoint (``p``: a parser or an argument group)."""
    p.add_argument("--model_name", default="BRN", help=model_help)
    p.add_argument("--tile", type=int, default=None, help="tile images larger than this")
    p.add_argument("--tile_overlap", type=int, default=32, help="overlap of neighbouring tiles")


def setup(args: argparse.Namespace) -> torch.device:
    """What every tool does first: pick the device (the CPU unless --use_GPU), set the CPU threads, check the
    figures can be drawn."""
    device = resolve_device(args)
    if args.threads is not None:
        if args.threads < 1:
            raise AnalysisError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    require_matplotlib()
    return device


def split_paths(values: Sequence[str]) -> list[str]:
    """Flatten ``--data_paths a b,c`` into [a, b, c] (``utils.cli.split_list``)."""
    return split_list(values)


def dataset_labels(paths: Sequence[str]) -> list[str]:
    """Short unique labels: the fewest trailing path parts that tell the paths apart.

    ``datasets/Rain200H/test`` -> ``Rain200H/test`` (a generic last name such as ``test`` or
    ``norain`` always keeps its parent), ``demo_data/heavy/train/norain`` -> ``heavy/train/norain``
    when that is needed to be unique.
    """
    parts = [os.path.normpath(os.path.abspath(p)).strip(os.sep).split(os.sep) for p in paths]
    longest = max((len(p) for p in parts), default=1)
    for k in range(1, longest + 1):
        labels = []
        for p in parts:
            n = k
            while n < len(p) and all(q.lower() in _GENERIC_NAMES for q in p[-n:]):
                n += 1
            labels.append("/".join(p[-n:]))
        if len(set(labels)) == len(labels):
            return labels
    return ["/".join(p) for p in parts]


def check_labels(labels: Optional[Sequence[str]], paths: Sequence[str]) -> list[str]:
    if labels is None:
        return dataset_labels(paths)
    if len(labels) != len(paths):
        raise AnalysisError(f"--labels gives {len(labels)} names for {len(paths)} data paths")
    return list(labels)


# ---------------------------------------------------------------------------- data
def dataset_images(folder: str) -> list[str]:
    """The images a dataset folder stands for: ``folder/rain/*`` when it has rain/, else ``folder/*``.

    So ``Rain200H/test`` means its rainy images, and ``Rain200H/test/norain`` (or a folder of real
    rainy photos) can be mapped as a dataset of its own.
    """
    if not os.path.isdir(folder):
        raise AnalysisError(f"data path {folder} does not exist")
    source = os.path.join(folder, "rain") if os.path.isdir(os.path.join(folder, "rain")) else folder
    images = sorted(os.path.join(source, f) for f in os.listdir(source) if is_image(f))
    if not images:
        raise AnalysisError(f"data path {folder} holds no images (neither in rain/ nor directly)")
    return images


def dataset_pairs(folder: str) -> list[tuple[str, str]]:
    """(rainy, clean) pairs of a test folder with rain/ and norain/, with a one-line error otherwise."""
    if not os.path.isdir(folder):
        raise AnalysisError(f"data path {folder} does not exist")
    return find_pairs(folder)


def sample(items: Sequence, n: int, seed: int) -> list:
    """``n`` items drawn without replacement (all when n <= 0 or n >= len), in their original order."""
    if n <= 0 or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_meta(obj: Any) -> dict:
    """What one of our training checkpoints says about itself (empty for a bare state_dict).

    Keys: model_name, model_hparams, encoder_hparams, args (each present only when saved).
    """
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k] for k in ("model_name", "model_hparams", "encoder_hparams", "args") if k in obj}


def load_encoder_file(path: str, device: torch.device) -> tuple[nn.Module, dict]:
    """The ContrastiveEncoder of ``path`` in eval mode, and the checkpoint object it came from.

    ``path``: one of our training checkpoints (its ``encoder`` part) or a published MoCo
    state_dict (``encoder_q.*``/``encoder_k.*``); sized as ``test_model.py`` sizes it
    (``utils.eval.evaluation.encoder_dim``).
    """
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and "model" in obj and "encoder" not in obj:
        raise AnalysisError(f"{path} holds no encoder (a model trained without CoIC?); pass a CoIC checkpoint")
    state = obj.get("encoder", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise AnalysisError(f"{path} is not an encoder checkpoint (found a {type(state).__name__})")
    return encoder_from_checkpoint(obj, device), obj


# ---------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_batch(encoder: nn.Module, x: Tensor, feature: str = "z") -> Tensor:
    """x (B,3,ENCODER_SIZE,ENCODER_SIZE) in [0,1] -> (B,D) unit vectors from the key encoder.

    ``feature="z"``: the code CoI-M sees (D = dim). ``feature="feat"``: the spatial mean of the
    channel-normalised feature map, re-normalised (D = 256): what the published representation
    plots used.
    """
    z, feat = encoder.encoder_k(x)
    if feature == "z":
        return z
    if feature == "feat":
        return F.normalize(feat.mean(dim=(-2, -1)), dim=-1)
    raise AnalysisError(f"--feature must be z or feat, got {feature!r}")


@torch.no_grad()
def encode_images(encoder: nn.Module, paths: Sequence[str], device: torch.device, feature: str = "z",
                  batch_size: int = 16, progress: Optional[Callable[[int], Any]] = None,
                  unreadable: Optional[list] = None) -> Tensor:
    """Embeddings (N,D) float32 on the CPU of the images at ``paths``.

    Each image is resized to 128x128 as a whole, exactly as ``utils.eval.inference.image_code`` does
    at test time, so z here is the z that modulates the model. ``progress(n)`` is called after
    each batch with its size. An image that cannot be read raises ``UnreadableImageError``; with an
    ``unreadable`` list it is appended there instead and has no row (N counts the others).
    """
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        views = []
        for p in chunk:
            try:
                views.append(resize_square(read_image(p)[None].to(device), ENCODER_SIZE))
            except UnreadableImageError as exc:
                if unreadable is None:
                    raise
                logging.getLogger(__name__).warning("%s; left out", exc)
                unreadable.append(p)
        if views:
            out.append(encode_batch(encoder, torch.cat(views), feature).float().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 0)


# ---------------------------------------------------------------------------- statistics
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long series (float64); nan when undefined (n<2, constant)."""
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson: lengths differ ({a.numel()} vs {b.numel()})")
    if a.numel() < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


# ---------------------------------------------------------------------------- outputs
def fmt(value: Any) -> str:
    """CSV cell: floats with full precision (tables are read back exactly), None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """An analysis table as CSV, atomically, cells through ``fmt``."""
    tables.write_csv(path, header, [[fmt(v) for v in row] for row in rows])


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    return "\n".join(tables.markdown_table(header, [[cell(v) for v in row] for row in rows])) + "\n"


def new_figure(width: float, height: float):
    """A matplotlib Figure that renders with Agg, without touching pyplot's global backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("the figures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")


def require_matplotlib() -> None:
    """Fail before any work is done when the figures cannot be drawn."""
    new_figure(1, 1)


def save_figure(fig, path: str, dpi: int = 150) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def dataset_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_embeddings(path: str, embeddings: Tensor, labels: Sequence[str], names: Sequence[str]) -> None:
    """CSV with columns dataset, image, e0..e{D-1}: one row per image, values exact (repr)."""
    dim = embeddings.shape[1]
    rows = [[lab, name, *map(float, vec.tolist())] for lab, name, vec in zip(labels, names, embeddings)]
    write_csv(path, ["dataset", "image", *[f"e{i}" for i in range(dim)]], rows)


def read_embeddings(path: str) -> tuple[Tensor, list[str], list[str]]:
    """Read a ``write_embeddings`` CSV (or any hand-made one in that layout): (N,D) float64, labels, names."""
    if not os.path.isfile(path):
        raise AnalysisError(f"--embeddings file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or rows[0][:2] != ["dataset", "image"] or len(rows[0]) < 3:
        raise AnalysisError(f"{path} is not an embeddings CSV (header: dataset,image,e0,e1,...) with rows")
    try:
        values = torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]], dtype=torch.float64)
    except ValueError as exc:
        raise AnalysisError(f"{path}: a row is not numeric or has the wrong length ({exc})") from None
    return values, [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]


def add_embedding_args(p: argparse.ArgumentParser, num_images: int = 100) -> None:
    """Flags of the tools that encode images per dataset (or read embeddings already computed)."""
    g = p.add_argument_group("what to encode")
    g.add_argument("--feat_ext", default=None,
                   help="encoder checkpoint: one of our ckpt_*.pth, or a published MoCo state_dict")
    add_alias(g, "--encoder", "--feat_ext")
    add_list(g, "--data_paths", default=None, metavar="PATH",
             help="one dataset per folder (space- or comma-separated): a folder with rain/ means its "
                  "rainy images, any other folder its images (e.g. .../norain for clean ones)")
    add_list(g, "--labels", default=None, metavar="NAME",
             help="a name per data path, space- or comma-separated (default: the shortest distinctive tail of "
                  "each path)")
    g.add_argument("--num_images", type=int, default=num_images,
                   help="images per dataset, drawn at random with --seed (0: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    g.add_argument("--feature", choices=["z", "feat"], default="z",
                   help="z: the code that modulates the model; feat: the encoder's pooled feature map "
                        "(the published plots' choice)")
    g.add_argument("--batch_size", type=int, default=16, help="images encoded at once")
    g.add_argument("--embeddings", default=None,
                   help="use this embeddings CSV (dataset,image,e0,e1,...; e.g. a previous run's embeddings.csv) "
                        "instead of --feat_ext/--data_paths")


def gather_embeddings(args: argparse.Namespace, device: torch.device,
                      desc: str = "encode") -> tuple[Tensor, list[str], list[str]]:
    """Embeddings (N,D), dataset label and image name per row, from ``--embeddings`` or by encoding."""
    if args.embeddings:
        if args.feat_ext or args.data_paths:
            raise AnalysisError("give either --embeddings or --feat_ext with --data_paths, not both")
        return read_embeddings(args.embeddings)
    if not args.feat_ext or not args.data_paths:
        raise AnalysisError("give --feat_ext and --data_paths (or --embeddings)")
    paths = split_paths(args.data_paths)
    labels = check_labels(args.labels, paths)
    images = [sample(dataset_images(p), args.num_images, args.seed) for p in paths]
    encoder, _ = load_encoder_file(args.feat_ext, device)
    from tqdm import tqdm

    chunks, unreadable = [], []
    with tqdm(total=sum(map(len, images)), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for files in images:
            chunks.append(encode_images(encoder, files, device, args.feature, args.batch_size, bar.update,
                                        unreadable))
    if unreadable:  # the analysis goes on without them; each was named as it was met
        logging.getLogger(__name__).warning("%d unreadable image(s) left out of the embeddings", len(unreadable))
        left_out = set(unreadable)
        images = [[f for f in files if f not in left_out] for files in images]
        chunks = [c for c in chunks if c.numel()]
        if not chunks:
            raise AnalysisError(f"none of the {len(unreadable)} images drawn could be read, e.g. {unreadable[0]}")
    row_labels = [lab for lab, files in zip(labels, images) for _ in files]
    names = [os.path.basename(f) for files in images for f in files]
    return torch.cat(chunks).double(), row_labels, names


def run_tool(build_parser: Callable[[], argparse.ArgumentParser],
             run: Callable[[argparse.Namespace, torch.device], Any],
             argv: Optional[Sequence[str]] = None) -> int:
    """A tool's ``main``: parse its flags, then ``run(args, device)`` after :func:`setup`, inside
    ``utils.errors.cli_main`` (user mistakes become one ``error:`` line and exit 2).

    ``run`` returns an exit code, or the Markdown summary it wrote to ``--save_path``: that is
    printed, followed by where the results are, and the tool exits 0.
    """
    keep_freed_memory()  # before any tensor: large activations reuse heap pages (utils/allocator.py)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work() -> int:
        result = run(args, setup(args))
        if isinstance(result, str):
            print(result, end="")
            logging.getLogger(__name__).info("-> %s", args.save_path)
            return 0
        return result

    with trusted_checkpoints(getattr(args, "trust_checkpoint", False)):
        return cli_main(work)
