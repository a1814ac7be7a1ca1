"""The authors' published checkpoints by name: a registry, a verified one-time download, the offline recipe.

``--test_model coic-brn`` (``test_model.py``) and ``--pretrained baseline-brn`` (training) name
a published model instead of a path. Its files are downloaded once from the authors'
repository (github Schizophreni/CoIC at ``PUBLISHED_COMMIT``) into PyTorch's hub cache,
``<torch.hub.get_dir()>/checkpoints/coic/``, and each file, downloaded or cached, is checked
against its git blob id before it is used: SHA-1 of ``b"blob <size>\\0" + content``, what
``git hash-object`` prints. A download that fails the check is deleted; a partial one never
takes the final name (it is built beside it and renamed once verified).

Without a network, ``--weights_dir DIR`` (or ``COIC_WEIGHTS_DIR=DIR``) is the only place looked
at, and nothing is downloaded. A file is looked up there as (first found wins)
``DIR/<path in the authors' repo>`` (a clone of their repository: ``checkpoints/CoIC/brn_model.pth``),
``DIR/<that path without checkpoints/>`` (their ``checkpoints/`` folder: ``CoIC/brn_model.pth``) and
``DIR/<cache name>`` (flat, as in the cache: ``coic_brn_model.pth``; a copied cache folder works).
``COIC_WEIGHTS_URL`` replaces the download base URL (a mirror; the tests' local server).

Which backbones have published weights, and under which names, the registry says
(``models.Backbone.published_weights``); this file holds their download data (``PUBLISHED_MODELS``),
and a name one side has without the other is an error, never a silently missing model.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from models import BACKBONES, RegistryError
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.errors import UserError
from utils.io import atomic_path

logger = logging.getLogger("coic")

__all__ = ["PUBLISHED_COMMIT", "BASE_URL_ENV", "WEIGHTS_DIR_ENV", "PublishedFile", "PublishedModel",
           "PUBLISHED_MODELS", "published_models", "published_names", "get_published", "published_or_path",
           "git_blob_id", "cache_dir", "base_url", "file_url", "fetch", "fetch_model", "availability",
           "describe_published", "CheckpointChoice", "choose_checkpoint", "DownloadError"]

PUBLISHED_COMMIT = "8c99e733ab25869bf87cd720b9a6a65d62914dd6"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/Schizophreni/CoIC/{PUBLISHED_COMMIT}"
BASE_URL_ENV = "COIC_WEIGHTS_URL"
WEIGHTS_DIR_ENV = "COIC_WEIGHTS_DIR"
TIMEOUT_S = 30.0  # per blocking network operation (connect, each read)
CHUNK = 1 << 16

# Failures of the network (not of this machine's disk): an offline machine, a proxy, a 404.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


@dataclass(frozen=True)
class PublishedFile:
    """One file of the authors' repository: its path there and its git blob id."""

    path: str  # e.g. checkpoints/CoIC/brn_model.pth
    blob_id: str  # SHA-1 of b"blob <size>\0" + content

    @property
    def local_name(self) -> str:
        """Flat file name in the cache (and in a flat --weights_dir): the folder keeps Baseline and CoIC apart."""
        folder, name = os.path.split(self.path)
        return f"{os.path.basename(folder).lower()}_{name}"


@dataclass(frozen=True)
class PublishedModel:
    """A published backbone checkpoint, with its encoder when it was trained with CoIC."""

    name: str
    backbone: str  # a models.BACKBONES name, which lists ``name`` in its published_weights
    load_mode: str  # what test_model.py runs it with by default
    trained_on: str
    description: str
    model: PublishedFile
    encoder: Optional[PublishedFile] = None

    @property
    def files(self) -> tuple[PublishedFile, ...]:
        return (self.model,) if self.encoder is None else (self.model, self.encoder)


_SYNTHETIC_MIX = "the mixed synthetic sets Rain200L, Rain200H, Rain800, DID-Data and DDN-Data"
_COIC = "with CoIC: CoI-M modulation by z from its rain-/detail-aware contrastive encoder (published beside it)"

# The download data of every name a backbone declares in ``published_weights`` (see published_models).
PUBLISHED_MODELS: dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel("baseline-brn", "BRN", "normal", _SYNTHETIC_MIX,
                   "BRN trained without CoIC (original BRN layout)",
                   PublishedFile("checkpoints/Baseline/brn_model.pth", "be2fc5fc3eacb4ebeb11002786e02592e9a9a9a5")),
    PublishedModel("coic-brn", "BRN", "tran", _SYNTHETIC_MIX, f"BRN trained {_COIC}",
                   PublishedFile("checkpoints/CoIC/brn_model.pth", "c461978e13e2cbb0df1eaee1d8db9eb2e7568187"),
                   PublishedFile("checkpoints/CoIC/brn_enc.pth", "e9c93740183cdfff74af45386f7845282ca837e4")),
    PublishedModel("baseline-rcdnet", "RCDNet", "normal", _SYNTHETIC_MIX, "RCDNet trained without CoIC",
                   PublishedFile("checkpoints/Baseline/rcdnet_model.pth", "ca79935609c0218b0a8cfb90155ed51e1f20c9c3")),
    PublishedModel("coic-rcdnet", "RCDNet", "tran", _SYNTHETIC_MIX, f"RCDNet trained {_COIC}",
                   PublishedFile("checkpoints/CoIC/rcdnet_model.pth", "8bdbf8481429ca42242fcbea5d0e4f84053c9613"),
                   PublishedFile("checkpoints/CoIC/rcdnet_enc.pth", "000fa38e02b18f5c1ad444fbf2b7caf911215230")),
)}


class DownloadError(UserError):
    """A published file that could not be downloaded, or did not match its git blob id."""


class _Unreachable(DownloadError):
    """The network failed (offline, timeout, HTTP error); ``reason`` says how."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- names
def published_models() -> dict[str, PublishedModel]:
    """The published models of the registered backbones, in registry order (``Backbone.published_weights``).

    A declared name without download data here, or data no registered backbone declares (or
    declares under another backbone), raises ``RegistryError`` naming the file to edit.
    """
    declared = {name: b.name for b in BACKBONES.values() for name in b.published_weights}
    missing = [f"{name} ({backbone})" for name, backbone in declared.items() if name not in PUBLISHED_MODELS]
    if missing:
        raise RegistryError(f"published weights {', '.join(missing)} are declared in models/__init__.py "
                            "(Backbone.published_weights) but have no files: add them to PUBLISHED_MODELS in "
                            "models/pretrained.py")
    stray = [f"{name} ({m.backbone})" for name, m in PUBLISHED_MODELS.items() if declared.get(name) != m.backbone]
    if stray:
        raise RegistryError(f"models/pretrained.py PUBLISHED_MODELS has {', '.join(stray)}, which no registered "
                            "backbone declares: add the name to that backbone's published_weights in "
                            "models/__init__.py, or remove the entry")
    return {name: PUBLISHED_MODELS[name] for name in declared}


def published_names() -> list[str]:
    return list(published_models())


def get_published(name: str, flag: str = "--test_model") -> PublishedModel:
    """The registry entry ``name``; an unknown name raises ``UserError`` listing the valid ones."""
    known = published_models()
    if name not in known:
        raise UserError(f"{flag} {name}: checkpoint not found, and not a published model name; published names: "
                        f"{', '.join(known)} (python test_model.py --list_models describes them)")
    return known[name]


def published_or_path(spec: str, flag: str) -> Optional[PublishedModel]:
    """None when ``spec`` is an existing path (a path always wins), else its registry entry (or ``UserError``)."""
    return None if os.path.exists(spec) else get_published(spec, flag)


# --------------------------------------------------------------------------- files
def git_blob_id(path: str) -> str:
    """Git's blob id of the file at ``path``: SHA-1 of ``b"blob <size>\\0" + content`` (as ``git hash-object``)."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> str:
    """Where downloads go: ``<torch.hub.get_dir()>/checkpoints/coic`` (``TORCH_HOME`` moves it)."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", "coic")


def base_url() -> str:
    return (os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def file_url(f: PublishedFile) -> str:
    return f"{base_url()}/{f.path}"


def _weights_dir_candidates(f: PublishedFile, weights_dir: str) -> list[str]:
    inside_checkpoints = f.path.split("/", 1)[1] if f.path.startswith("checkpoints/") else f.path
    return [os.path.join(weights_dir, *p.split("/")) for p in (f.path, inside_checkpoints, f.local_name)]


def _weights_dir(weights_dir: Optional[str]) -> Optional[str]:
    return weights_dir or os.environ.get(WEIGHTS_DIR_ENV) or None


def _from_weights_dir(f: PublishedFile, weights_dir: str) -> str:
    candidates = _weights_dir_candidates(f, weights_dir)
    for path in candidates:
        if os.path.isfile(path):
            got = git_blob_id(path)
            if got != f.blob_id:  # the user's file: reported, never deleted
                raise DownloadError(f"{path} is not the published {f.path} (git blob {got}, expected {f.blob_id}); "
                                    f"download it again from {file_url(f)}")
            return path
    raise DownloadError(f"--weights_dir {weights_dir} has no {f.path}: looked for {', '.join(candidates)}; "
                        f"download it from {file_url(f)}")


def _download(url: str, dest: str, blob_id: str, progress: bool) -> None:
    """Stream ``url`` to a temporary file beside ``dest``, hashing as it comes; rename it to ``dest`` only
    when complete and equal to ``blob_id``. Any failure leaves neither ``dest`` nor a temporary file."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, atomic_path(dest) as tmp:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            # git's header needs the size first: hash while streaming when the server sends it
            digest = hashlib.sha1(b"blob %d\0" % size) if size is not None else None
            received = 0
            with open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=os.path.basename(dest), disable=not progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if digest is not None:
                        digest.update(chunk)
            if size is not None and received != size:
                raise DownloadError(f"download of {url} was cut short ({received} of {size} bytes); nothing was "
                                    "kept: run the command again")
            got = digest.hexdigest() if digest is not None else git_blob_id(tmp)
            if got != blob_id:
                raise DownloadError(f"{url} is not the published file (git blob {got}, expected {blob_id}); "
                                    f"nothing was kept: check {BASE_URL_ENV} or run the command again")
    except _NETWORK_ERRORS as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        raise _Unreachable(f"cannot download {url} ({reason}); put the file at {dest}, or pass --weights_dir DIR "
                           f"(or set {WEIGHTS_DIR_ENV}=DIR) for a folder holding it", reason) from None


def fetch(f: PublishedFile, weights_dir: Optional[str] = None, progress: bool = True) -> str:
    """Local path of ``f``, verified against its git blob id.

    From ``weights_dir`` (or ``$COIC_WEIGHTS_DIR``) when given, never downloading; else from the
    cache, downloading it on first use (and again when the cached copy is corrupt).
    """
    folder = _weights_dir(weights_dir)
    if folder:
        return _from_weights_dir(f, folder)
    dest = os.path.join(cache_dir(), f.local_name)
    if os.path.isfile(dest):
        got = git_blob_id(dest)
        if got == f.blob_id:
            return dest
        logger.warning("cached %s is corrupt (git blob %s, expected %s): downloading it again", dest, got, f.blob_id)
        os.remove(dest)
    logger.info("downloading %s to %s (once)", file_url(f), dest)
    _download(file_url(f), dest, f.blob_id, progress)
    return dest


def fetch_model(model: PublishedModel, weights_dir: Optional[str] = None, encoder: bool = True,
                progress: bool = True) -> tuple[str, Optional[str]]:
    """(backbone checkpoint path, encoder path or None) of ``model``; ``encoder=False`` skips the encoder.

    Offline, one ``DownloadError`` names every URL still needed and where to put it.
    """
    files = [model.model] + ([model.encoder] if encoder and model.encoder is not None else [])
    paths = []
    for k, f in enumerate(files):
        try:
            paths.append(fetch(f, weights_dir, progress))
        except _Unreachable as exc:
            where = cache_dir()
            needed = " and ".join(f"{file_url(g)} at {os.path.join(where, g.local_name)}" for g in files[k:])
            raise DownloadError(f"cannot download {model.name} ({exc.reason}): put {needed}, or pass --weights_dir "
                                f"DIR (or set {WEIGHTS_DIR_ENV}=DIR) for a folder holding "
                                f"{' and '.join(g.path for g in files[k:])} (a clone of the authors' repository, "
                                "its checkpoints/ folder, or the flat names above)") from None
    return paths[0], (paths[1] if len(paths) > 1 else None)


# --------------------------------------------------------------------------- listing
def availability(model: PublishedModel, weights_dir: Optional[str] = None) -> str:
    """Whether ``model``'s files are ready: in the cache (or ``weights_dir``), verified."""
    folder = _weights_dir(weights_dir)
    states = []
    for f in model.files:
        if folder:
            found = [p for p in _weights_dir_candidates(f, folder) if os.path.isfile(p)]
        else:
            found = [p for p in [os.path.join(cache_dir(), f.local_name)] if os.path.isfile(p)]
        states.append("missing" if not found else "ok" if git_blob_id(found[0]) == f.blob_id else "corrupt")
    place = "in --weights_dir" if folder else "cached"
    if all(s == "ok" for s in states):
        return place
    if "corrupt" in states:
        return f"{place}, corrupt" + ("" if folder else " (downloaded again on use)")
    return f"partly {place}" if "ok" in states else ("not in --weights_dir" if folder else "not cached")


def describe_published(weights_dir: Optional[str] = None) -> str:
    """The ``--list_models`` table: name, backbone, default mode, availability, what it is."""
    rows = [("name", "backbone", "mode", "files", "description")]
    rows += [(m.name, m.backbone, m.load_mode, availability(m, weights_dir), f"{m.description}; trained on "
              f"{m.trained_on}") for m in published_models().values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    folder = _weights_dir(weights_dir)
    lines.append(f"files from --weights_dir {folder}" if folder else
                 f"downloaded on first use from {base_url()} into {cache_dir()} (verified by git blob id)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- --test_model
@dataclass(frozen=True)
class CheckpointChoice:
    """What ``--test_model`` named, with the backbone and load mode to run it with."""

    model_name: str
    load_mode: str
    path: Optional[str] = None  # a checkpoint file the user gave
    published: Optional[PublishedModel] = None

    def files(self, feat_ext: Optional[str], weights_dir: Optional[str] = None,
              progress: bool = True) -> tuple[str, Optional[str]]:
        """(backbone checkpoint, encoder checkpoint or None); a published encoder is fetched only for
        ``--load_mode tran`` without ``--feat_ext``."""
        if self.published is None:
            published_or_path(self.path, "--test_model")  # a missing file that is no name: the error lists the names
            return self.path, feat_ext
        need_encoder = self.load_mode == "tran" and feat_ext is None
        model_path, encoder_path = fetch_model(self.published, weights_dir, encoder=need_encoder, progress=progress)
        return model_path, feat_ext if feat_ext is not None else encoder_path


def _stored_model_name(path: str) -> Optional[str]:
    """The backbone a checkpoint of this repository names (``model_name``), None for any other file; the
    file is read with the safe loader, and one it refuses is left for the real load to report."""
    if not os.path.isfile(path):
        return None
    try:
        ckpt = read_checkpoint(path, trust=False)
    except CheckpointError:
        return None
    name = ckpt.get("model_name") if isinstance(ckpt, dict) else None
    return name if isinstance(name, str) else None


def choose_checkpoint(spec: str, model_name: Optional[str], load_mode: Optional[str]) -> CheckpointChoice:
    """Resolve ``--test_model`` (no download yet): an existing path wins; else a published name, whose
    backbone and load mode are the defaults; a file of this repository defaults to the backbone it
    names. ``model_name``/``load_mode``: the flags, None when not given.
    A spec that is neither is reported by ``files`` (where a missing checkpoint always was)."""
    published = None if os.path.exists(spec) else published_models().get(spec)
    if published is None:
        return CheckpointChoice(model_name or _stored_model_name(spec) or "BRN", load_mode or "normal", path=spec)
    if model_name is not None and model_name != published.backbone:
        raise UserError(f"--test_model {spec} is a published {published.backbone} model, not {model_name}; "
                        "drop --model_name")
    mode = load_mode or published.load_mode
    if mode == "tran" and published.encoder is None:
        raise UserError(f"--test_model {spec} was trained without CoIC (no encoder); use --load_mode normal, or a "
                        f"coic-* name")
    return CheckpointChoice(published.backbone, mode, published=published)
