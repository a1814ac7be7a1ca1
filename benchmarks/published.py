"""Times the published CoIC code (github Schizophreni/CoIC) as its train scripts run an iteration.

``benchmarks.benchmark --published DIR`` starts this file as a worker process for each backbone:

    python benchmarks/published.py --worker_params PARAMS.json --worker_out OUT.json   (cwd: DIR)

It runs in a process of its own because the published code and this project both have a
top-level ``models`` package (and the published one expects its vendored ``timm``): DIR goes
first on ``sys.path`` and nothing of this project but the measuring helpers of
``benchmarks.timing`` is imported.

What one published iteration is (read from ``train_<X>.py``), the same in both stages except
where noted:

1. batch transforms: key = random flips of the resized rainy image, detail negatives = the
   resized clean image repeated ``n_neg`` times, Gaussian-blurred and flipped (torchvision
   transforms, one draw per batch);
2. rain negative: the clean crop plus the rain layer (rain - clean) with the largest L1 distance
   (within the batch for BRN/IDT, over an archive of the last 64 // batch batches otherwise);
3. stage 1: ``model(x, None, 'normal')`` and the backbone's own loss; CoIC stage: MoCo forward,
   ``model(x, z_q, 'tran')``, base loss + weight x cross-entropy of the logits;
4. backward, (DRSformer: gradient clipping to 0.01; DGUNet in the CoIC stage: the explosion check),
   both optimizer steps. Schedulers and logging are left out, as in our measured step.

Losses are the published ones: -SSIM (``SSIM.py``) for BRN/IDT, RCDNet's stage MSE on 0-255
(``train_RCDNet.loss_func``), DGUNet's Charbonnier + 0.05 edge over all stages (the classes of
``train_DGUNet.py``), L1 for DRSformer. Inference follows ``test_model.py``: z from the key
encoder on the 128x128 resize; RCDNet on 0-255; DGUNet/DRSformer reflect-padded to a multiple
of 8; IDT in tiles of its training size (overlap as given), batched as the published test does.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PublishedError(Exception):
    """The published code cannot be imported or run for this backbone."""


@dataclass(frozen=True)
class PublishedBackbone:
    """How the published code builds, trains and runs one backbone (reference hyper-parameters). Its
    class ("module:Class") is the registry's ``published_code``, which the parent passes in."""
    opt: dict
    loss: str  # "ssim", "rcdnet", "stages" (DGUNet), "l1"
    lr: float
    contra_weight: float = 0.2
    in_batch_rain_negative: bool = False  # BRN/IDT: max-L1 rain within the batch, else over an archive
    adamw: bool = False
    clip: Optional[float] = None
    explosion_check: bool = False
    pad_multiple: int = 1
    tiles: bool = False  # IDT: fixed input size, tiled at inference
    extra_tran_names: tuple = ()  # parameter names (besides 'g2pa') in the CoIC optimizer


# Keyed by registry name: exactly the backbones that declare ``published_code`` (``counterparts`` checks).
PUBLISHED = {
    "BRN": PublishedBackbone({"inter_iter": 8}, "ssim", 1e-3, in_batch_rain_negative=True),
    "RCDNet": PublishedBackbone({"inter_iter": 17, "num_map": 32, "num_channel": 32, "num_block": 4},
                                "rcdnet", 1e-3, contra_weight=50.0),
    "DGUNet": PublishedBackbone({"depth": 5}, "stages", 2e-4, explosion_check=True, pad_multiple=8),
    "IDT": PublishedBackbone({}, "ssim", 1e-4, in_batch_rain_negative=True, tiles=True),
    # select_model.py imports a DRSformer_PA module that the repository does not ship.
    "DRSformer": PublishedBackbone({}, "l1", 3e-4, adamw=True, clip=0.01, pad_multiple=8,
                                   extra_tran_names=("context_emb",)),
}
N_NEG = 4
ENCODER_SIZE = 128


@contextlib.contextmanager
def _quiet():
    """The published modules print at import and construction: keep the worker's stdout clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _cwd(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _cuda_calls_stay_put():
    """Make ``Tensor.cuda()`` a no-op: the published MoCo.forward moves its labels with an
    unconditional ``.cuda()``, which fails on a CPU-only machine."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _stub_module(name: str, **attrs) -> None:
    """Register an empty module for an import the measured code never uses (opencv, tensorboardX)."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def import_published(directory: str) -> types.SimpleNamespace:
    """Import the published modules from ``directory`` (must be called before any ``models`` import)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(os.path.join(directory, "models")):
        raise PublishedError(f"{directory} is not a checkout of Schizophreni/CoIC (no models/ folder)")
    loaded = sys.modules.get("models")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "").startswith(directory):
        raise PublishedError("another 'models' package is already imported; run this adapter in its own process")
    # The train scripts import opencv (data loading) and tensorboardX (logging) at the top;
    # the loss code taken from them needs neither.
    _stub_module("cv2")
    _stub_module("tensorboardX", SummaryWriter=object)
    sys.path[:] = [directory] + [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT]
    with _quiet(), _cwd(directory):
        try:
            return types.SimpleNamespace(
                SSIM=importlib.import_module("SSIM").SSIM,
                MoCo=importlib.import_module("models.contrastive").MoCo,
                train_RCDNet=importlib.import_module("train_RCDNet"),
                train_DGUNet=importlib.import_module("train_DGUNet"),
                directory=directory)
        except ImportError as exc:
            raise PublishedError(f"published code not importable: {exc}") from None


def counterparts(names: Sequence[str]) -> dict[str, str]:
    """{name: "module:Class"} of the published code, for the backbones of ``names`` whose registry entry
    declares ``published_code`` (the parent's side: imports this project's ``models``). A declared
    counterpart without an adapter in ``PUBLISHED``, or an adapter for a backbone that declares none,
    raises ``models.RegistryError``."""
    from models import BACKBONES, RegistryError

    stray = [n for n in PUBLISHED if n not in BACKBONES or BACKBONES[n].published_code is None]
    if stray:
        raise RegistryError(f"benchmarks/published.py PUBLISHED adapts {', '.join(stray)}, for which "
                            "models/__init__.py declares no published_code: declare it there, or remove the adapter")
    missing = [n for n in names if BACKBONES[n].published_code is not None and n not in PUBLISHED]
    if missing:
        raise RegistryError(f"models/__init__.py declares published_code for {', '.join(missing)}, but "
                            "benchmarks/published.py PUBLISHED has no adapter for it: add one there")
    return {n: BACKBONES[n].published_code for n in names if BACKBONES[n].published_code is not None}


class PublishedRunner:
    """One published backbone with its MoCo encoder, optimizers and losses, ready to step.
    ``target``: its class in the published code, "module:Class" (the registry's ``published_code``)."""

    def __init__(self, name: str, code: types.SimpleNamespace, batch: int, crop: int, device: torch.device,
                 target: str):
        import torchvision.transforms as T

        if name not in PUBLISHED:
            raise PublishedError(f"no published adapter for {name}; available: {', '.join(PUBLISHED)}")
        self.spec = spec = PUBLISHED[name]
        self.device, self.batch, self.crop = device, batch, crop
        self.opt = types.SimpleNamespace(model_name=name, dim_in=128, use_GPU=device.type == "cuda",
                                         batch_size=batch, crop_size=crop, n_neg=N_NEG,
                                         contra_loss_weight=spec.contra_weight, temperature=1.0, **spec.opt)
        with _quiet(), _cwd(code.directory):  # RCDNet reads models/kernel.mat relative to the cwd
            module, cls_name = target.split(":")
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except ImportError as exc:
                raise PublishedError(f"published {name} not importable: {exc}") from None
            # IDT's position tables are built for one input size: the training crop.
            self.model = (cls(self.opt, img_size=crop) if spec.tiles else cls(self.opt)).to(device)
            self.moco = code.MoCo(in_channels=3, out_channels=32, dim=128, temperature=1.0).to(device)
        tran_names = ("g2pa",) + spec.extra_tran_names
        base = [p for n, p in self.model.named_parameters() if p.requires_grad and not any(t in n for t in tran_names)]
        tran = [p for n, p in self.model.named_parameters() if p.requires_grad and any(t in n for t in tran_names)]
        tran += list(self.moco.parameters())  # the published scripts hand MoCo's key encoder over too
        if spec.adamw:
            self.optimizers = [torch.optim.AdamW(base, lr=spec.lr, weight_decay=1e-4),
                               torch.optim.AdamW(tran, lr=spec.lr)]
        else:
            self.optimizers = [torch.optim.Adam(base, lr=spec.lr), torch.optim.Adam(tran, lr=spec.lr)]
        self.key_transform = T.Compose([T.RandomHorizontalFlip(), T.RandomVerticalFlip()])
        self.negative_transform = T.Compose([T.GaussianBlur(kernel_size=11, sigma=(0.3, 1.5)),
                                             T.RandomHorizontalFlip(), T.RandomVerticalFlip()])
        self.resize = T.Resize(size=(ENCODER_SIZE, ENCODER_SIZE))
        self.rain_archive: list[Tensor] = []
        self.contrastive = nn.CrossEntropyLoss()
        self.base_loss = self._make_loss(code)
        self.gpu_calls = contextlib.nullcontext if device.type == "cuda" else _cuda_calls_stay_put

    # ------------------------------------------------------------------ losses
    def _make_loss(self, code: types.SimpleNamespace) -> Callable[[Tensor, Tensor, Optional[Tensor], str], Tensor]:
        """loss(x, y, z, mode) with the backbone's published criterion; also keeps the output."""
        kind, model = self.spec.loss, self.model
        if kind == "ssim":
            ssim = code.SSIM()
            return lambda x, y, z, mode: -ssim(model(x, z, mode), y)
        if kind == "l1":
            l1 = nn.L1Loss(reduction="mean")
            return lambda x, y, z, mode: l1(model(x, z, mode), y)
        if kind == "rcdnet":
            code.train_RCDNet.opt = self.opt  # its loss_func reads the script's global ``opt``

            def rcdnet(x: Tensor, y: Tensor, z: Optional[Tensor], mode: str) -> Tensor:
                x255, y255 = 255.0 * x, 255.0 * y  # RCDNet trains on 0-255
                b0, list_b, list_r = model(x255, z, mode)
                return code.train_RCDNet.loss_func(b0, list_b, list_r, x255, y255)
            return rcdnet
        if kind == "stages":
            charbonnier, edge = code.train_DGUNet.CharbonnierLoss(), code.train_DGUNet.EdgeLoss()

            def stages(x: Tensor, y: Tensor, z: Optional[Tensor], mode: str) -> Tensor:
                outs = model(x, z, mode)
                self._last_image = outs[0]
                return (sum(charbonnier(o, y) for o in outs) + 0.05 * sum(edge(o, y) for o in outs))
            return stages
        raise PublishedError(f"unknown published loss {kind!r}")

    # ------------------------------------------------------------------ one iteration
    def contrast_inputs(self, rain: Tensor, clean: Tensor, query: Tensor, query_clean: Tensor):
        """(query, key, negatives (B,1+n_neg,3,c,c)) as every published iteration builds them."""
        b, c = self.batch, self.crop
        key = self.key_transform(query)
        details = self.negative_transform(query_clean.unsqueeze(1).expand(b, N_NEG, 3, c, c).reshape(-1, 3, c, c))
        layers = rain - clean
        if self.spec.in_batch_rain_negative:
            bank = layers
        else:
            self.rain_archive = (self.rain_archive + [layers])[-max(1, 64 // b):]
            bank = torch.cat(self.rain_archive, dim=0)
        farthest = (layers.unsqueeze(1) - bank.unsqueeze(0)).abs().sum(dim=(2, 3, 4)).argmax(dim=-1)
        rain_negative = (bank[farthest] + clean).clamp_(0.0, 1.0)
        negatives = torch.cat([rain_negative.unsqueeze(1), details.view(b, N_NEG, 3, c, c)], dim=1)
        return query, key, negatives

    def step(self, batch: tuple, coic: bool) -> None:
        rain, clean, query, query_clean = batch
        q, k, negatives = self.contrast_inputs(rain, clean, query, query_clean)
        for opt in self.optimizers:
            opt.zero_grad()
        if coic:
            with self.gpu_calls():
                logits, labels, z = self.moco(q, k, negatives)
            total = self.base_loss(rain, clean, z, "tran") + self.spec.contra_weight * self.contrastive(logits, labels)
        else:
            total = self.base_loss(rain, clean, None, "normal")
        total.backward()
        if coic and self.spec.explosion_check and self._last_image.abs().max() > 10:
            for group in ([p for p in self.optimizers[0].param_groups[0]["params"]],
                          [p for p in self.optimizers[1].param_groups[0]["params"]]):
                torch.nn.utils.clip_grad_norm_(group, max_norm=1e-8)
        if self.spec.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.clip)
        for opt in self.optimizers:
            opt.step()

    # ------------------------------------------------------------------ inference
    def _forward_image(self, x: Tensor, z: Optional[Tensor]) -> Tensor:
        mode = "normal" if z is None else "tran"
        if self.spec.loss == "rcdnet":
            return self.model(255.0 * x, z, mode)[1][-1] / 255.0
        out = self.model(x, z, mode)
        return out[0] if self.spec.loss == "stages" else out

    @torch.no_grad()
    def infer(self, x: Tensor, coic: bool, overlap: int) -> Tensor:
        """Derain x (1,3,H,W) as the published test script does; (1,3,H,W) in [0,1]."""
        z = self.moco.encoder_k(self.resize(x))[0] if coic else None
        h, w = x.shape[-2:]
        if not self.spec.tiles:
            m = self.spec.pad_multiple
            ph, pw = (-h) % m, (-w) % m
            padded = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
            return self._forward_image(padded, z)[..., :h, :w].clamp(0.0, 1.0)
        return self._tiled(x, z, overlap).clamp(0.0, 1.0)

    def _tiled(self, x: Tensor, z: Optional[Tensor], overlap: int) -> Tensor:
        """Tiles of the training size, blended with the published inverse-distance-to-centre weights."""
        t = self.crop
        stride = t - overlap
        h, w = x.shape[-2:]

        def starts(size: int) -> list[int]:
            s = list(range(0, size - t + 1, stride))
            return s if s[-1] == size - t else s + [size - t]

        boxes = [(i, j) for i in starts(h) for j in starts(w)]
        per_batch = 6 * max(1, 512 // t) ** 2  # the published test's tile batch
        r = torch.arange(t, device=x.device, dtype=x.dtype) - t / 2
        weight = 1.0 / torch.sqrt(r[:, None] ** 2 + r[None, :] ** 2 + 1e-3)
        out, norm = torch.zeros_like(x), torch.zeros_like(x[:, :1])
        for k in range(0, len(boxes), per_batch):
            chunk = boxes[k:k + per_batch]
            tiles = torch.cat([x[..., i:i + t, j:j + t] for i, j in chunk])
            y = self._forward_image(tiles, None if z is None else z.expand(len(chunk), -1)).clamp(0.0, 1.0)
            for (i, j), yt in zip(chunk, y):
                out[0, :, i:i + t, j:j + t] += yt * weight
                norm[0, :, i:i + t, j:j + t] += weight
        return out / norm


def measure_published(params: dict) -> dict:
    """Step and inference timings of the published code for one case (see the module docstring)."""
    from benchmarks.timing import (PeakMemory, median_ms, median_rate, prime_libraries, synthetic_batch,
                                      time_calls, write_profile)

    code = import_published(params["directory"])
    torch.set_num_threads(params["threads"])
    device = torch.device(params["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    prime_libraries()
    memory = PeakMemory(device)
    memory.start()
    runner = PublishedRunner(params["model"], code, params["batch"], params["crop"], device, params["published_code"])
    runner.model.train()
    runner.moco.train()
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in synthetic_batch(params["batch"], params["crop"], generator))
               for _ in range(2)]
    warmup, iters = params["warmup"], params["iters"]
    stage1 = time_calls(lambda i: runner.step(batches[i % 2], coic=False), warmup, iters, device)
    coic = time_calls(lambda i: runner.step(batches[i % 2], coic=True), warmup, iters, device)
    prep = time_calls(lambda i: runner.contrast_inputs(*batches[i % 2]), warmup, iters, device)
    peak = memory.peak_mib()
    if params.get("profile_path"):
        write_profile(params["profile_path"], lambda: runner.step(batches[0], coic=True), device)
    runner.model.eval()
    runner.moco.eval()
    x = synthetic_batch(1, params["infer_size"], generator)[0].to(device)
    normal = time_calls(lambda i: runner.infer(x, False, params["tile_overlap"]), warmup, iters, device)
    modulated = time_calls(lambda i: runner.infer(x, True, params["tile_overlap"]), warmup, iters, device)
    return {"stage1_img_s": median_rate(stage1, params["batch"]), "coic_img_s": median_rate(coic, params["batch"]),
            "peak_mib": peak, "infer_normal_ms": median_ms(normal), "infer_coic_ms": median_ms(modulated),
            "contrast_inputs_ms": median_ms(prep)}


class PublishedServer:
    """``benchmarks.inference``'s requests on the published side: setup (builds the model and MoCo
    and saves their weights for our processes), run (timed restorations), output (saved tensors)."""

    def __call__(self, request: dict) -> dict:
        return getattr(self, request["op"])(request)

    def setup(self, r: dict) -> dict:
        from benchmarks.timing import synthetic_batch

        code = import_published(os.getcwd())
        torch.set_num_threads(r["threads"])
        self.device = torch.device(r["device"])
        torch.manual_seed(r["seed"])
        # The crop only sets a tiling backbone's size (IDT's img_size): our tile, which the compared input is.
        self.runner = PublishedRunner(r["model"], code, 1, r["check_size"], self.device, r["published_code"])
        self.runner.model.eval()
        self.runner.moco.eval()
        torch.save({"model": self.runner.model.state_dict(), "encoder": self.runner.moco.state_dict()},
                   r["state_path"])
        self.overlap = r["overlap"]
        generator = torch.Generator().manual_seed(r["seed"])
        self.x = synthetic_batch(1, r["size"], generator)[0].to(self.device)
        self.x_check = synthetic_batch(1, r["check_size"], generator)[0].to(self.device)
        return {"ok": True}

    def run(self, r: dict) -> dict:
        from benchmarks.timing import time_restorations

        return time_restorations(lambda: self.runner.infer(self.x, r["mode"] == "coic", self.overlap), r["n"],
                                 self.device)

    @torch.no_grad()
    def output(self, r: dict) -> dict:
        z = self.runner.moco.encoder_k(self.runner.resize(self.x_check))[0] if r["mode"] == "coic" else None
        torch.save(self.runner._forward_image(self.x_check, z).float().cpu(), r["path"])
        return {"ok": True}


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Worker of benchmarks.benchmark --published: times the published "
                                "CoIC code for one backbone (run it through benchmarks/benchmark.py).")
    p.add_argument("--worker_params", help="JSON file with the case")
    p.add_argument("--worker_out", help="JSON file the result is written to")
    p.add_argument("--serve", action="store_true", help="answer benchmarks.inference's requests on stdin")
    args = p.parse_args(argv)
    # The helpers of benchmarks.timing are needed, but the repository must come after the
    # published checkout on sys.path so that ``models`` is the published package.
    sys.path.append(REPO_ROOT)
    if args.serve:
        from benchmarks.serve import serve

        return serve(PublishedServer())
    if not (args.worker_params and args.worker_out):
        p.error("--worker_params and --worker_out are required (or --serve)")
    from benchmarks.timing import worker_main

    return worker_main(args.worker_params, args.worker_out, measure_published)


if __name__ == "__main__":
    sys.exit(main())
