"""RCDNet (Wang et al., CVPR 2020) with CoI-M modulated proximal networks, as used by CoIC.

RCDNet models a rainy image as ``O = B + R`` with the rain layer written as a convolutional
dictionary ``R = sum_n C_n * M_n`` (C: rain kernels shared by all images, M: sparse rain maps).
It unrolls ``inter_iter`` proximal-gradient steps that alternate

    M <- proxNet_M(M - eta1 * C^T (C*M - (O - B)))       (rain-map update)
    B <- proxNet_B((1 - eta2) * B + eta2 * (O - C*M))     (background update)

Every proximal network is a stack of residual conv-BN blocks whose 3x3 convolutions are
``ModulatedConv2d`` layers, so a CoIC code ``z`` adapts all of them per sample.

Scale: like the reference, the network works on 0-255 pixel values. ``forward`` takes and
returns [0,1] images; ``forward_stages`` takes a [0,1] image and returns every intermediate
estimate on the 0-255 scale, which is what the reference loss is computed on.

Parameter names: the reference calls the proximal networks ``proxNet_M_S``, ``proxNet_B_S``,
``proxNet_B_0``, ``proxNet_B_L`` and their block lists ``layer``; ``remap_legacy_keys``
translates those names, so published checkpoints load with ``utils.checkpoint.load_weights``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.coim import ModulatedConv2d
from utils.errors import ModelConfigError

__all__ = ["RCDNet", "RCDNetStages", "RAIN_KERNEL_MODES", "streak_kernel_bank", "load_rain_kernel"]

# "shared": one kernel tensor for the first and the later stages (the published code); "separate":
# two parameters that start equal and are trained apart.
RAIN_KERNEL_MODES = ("shared", "separate")


class RCDNetStages(NamedTuple):
    """Everything the RCDNet training loss needs; all tensors (B,3,H,W) on the 0-255 scale.

    b0:          background from the initialisation network.
    backgrounds: ``inter_iter + 1`` background estimates; ``backgrounds[-1]`` is the final
                 output (the extra refinement network), the others come from the stages.
    rain_layers: ``inter_iter`` rain-layer estimates ``C * M``, one per stage.
    """

    b0: Tensor
    backgrounds: list[Tensor]
    rain_layers: list[Tensor]


# --------------------------------------------------------------------------------------
# Rain kernels
# --------------------------------------------------------------------------------------

def streak_kernel_bank(num_maps: int = 32, size: int = 9, channels: int = 3,
                       mass: float = 0.5) -> Tensor:
    """A deterministic bank of soft rain-streak kernels, shape (channels, num_maps, size, size).

    Each kernel is an anisotropic Gaussian: narrow across the streak (sigma 0.6 px) and
    of one of four lengths along it, tilted by one of eight angles within +-35 degrees of
    vertical (rain falls nearly vertically). Kernel ``n`` uses angle ``n % 8`` and length
    ``(n // 8) % 4``. Entries are non-negative and every kernel sums to ``mass``; the
    RCDNet initial kernels are likewise non-negative near-vertical streaks with sums of
    about 0.15-1.0, identical for the three colour channels (rain is achromatic).
    """
    if size % 2 == 0 or size < 1:
        raise ValueError(f"rain kernel size must be a positive odd number, got {size}")
    angles = torch.linspace(-35.0, 35.0, 8, dtype=torch.float64) * (math.pi / 180.0)
    lengths = torch.tensor([0.5, 1.2, 2.2, 3.5], dtype=torch.float64)  # sigma along the streak
    across = 0.6

    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    bank = torch.empty(num_maps, size, size, dtype=torch.float64)
    for n in range(num_maps):
        theta = angles[n % len(angles)]
        sigma = lengths[(n // len(angles)) % len(lengths)]
        # Coordinates along / across a line tilted by theta from the vertical axis.
        along = rows * torch.cos(theta) + cols * torch.sin(theta)
        normal = cols * torch.cos(theta) - rows * torch.sin(theta)
        blob = torch.exp(-0.5 * ((along / sigma) ** 2 + (normal / across) ** 2))
        bank[n] = blob * (mass / blob.sum())
    return bank.float().unsqueeze(0).repeat(channels, 1, 1, 1)


def load_rain_kernel(source: Union[str, os.PathLike, Tensor], num_maps: int,
                     channels: int = 3) -> Tensor:
    """Read initial rain kernels (channels, num_maps, k, k) from a tensor or a file.

    Files: ``.mat`` (MATLAB, variable ``C9`` as in RCDNet's ``kernel.mat``), ``.npy``, or
    ``.pt``/``.pth`` (a tensor, or a dict holding one under ``C9``). Raises a one-line
    ``ValueError`` naming the source if it is missing, unreadable or of the wrong shape.
    """
    if isinstance(source, Tensor):
        name, data = "tensor", source.detach().cpu()
    else:
        name = os.fspath(source)
        data = _read_kernel_file(name)
    if not isinstance(data, Tensor):
        data = torch.as_tensor(data)
    expected = f"(channels={channels}, num_map={num_maps}, k, k) with odd k"
    if (data.dim() != 4 or data.shape[0] != channels or data.shape[1] != num_maps
            or data.shape[2] != data.shape[3] or data.shape[2] % 2 == 0):
        raise ModelConfigError(f"rain kernel {name}: shape {tuple(data.shape)} is not {expected}")
    if not torch.isfinite(data).all():
        raise ModelConfigError(f"rain kernel {name}: contains NaN or Inf")
    return data.float().clone()


def _read_kernel_file(path: str):
    if not os.path.isfile(path):
        raise ModelConfigError(f"rain kernel file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".mat":
            import scipy.io  # optional dependency, only needed for MATLAB files

            contents = scipy.io.loadmat(path)
            if "C9" not in contents:
                raise KeyError("no variable 'C9'")
            return contents["C9"]
        if ext == ".npy":
            import numpy as np

            return np.load(path, allow_pickle=False)
        if ext in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "C9" not in obj:
                    raise KeyError("no entry 'C9'")
                obj = obj["C9"]
            return obj
    except Exception as exc:  # unreadable file, missing variable, ...
        # Keep the message to one line: loader errors can span a whole paragraph.
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelConfigError(f"rain kernel file {path} cannot be read ({type(exc).__name__}: {detail})") from None
    raise ModelConfigError(f"rain kernel file {path}: unsupported extension {ext!r} (use .mat, .npy or .pt)")


# --------------------------------------------------------------------------------------
# Proximal networks
# --------------------------------------------------------------------------------------

class _ResidualUnit(nn.Module):
    """conv-BN-ReLU-conv-BN on (B,C,H,W); the caller adds the skip connection."""

    def __init__(self, channels: int, dim_in: int):
        super().__init__()
        self.conv1 = ModulatedConv2d(channels, channels, 3, padding=1, dim_in=dim_in)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = ModulatedConv2d(channels, channels, 3, padding=1, dim_in=dim_in)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        # In-place activations on fresh results (autograd keeps what it needs): one map less to
        # allocate and fill per layer, as in the reference.
        hidden = F.relu(self.bn1(self.conv1(x, z)), inplace=True)
        return self.bn2(self.conv2(hidden, z))


class _ProxNet(nn.Module):
    """``num_block`` residual units ``x <- relu(x + unit(x))``; (B,C,H,W) -> (B,C,H,W).

    With ``threshold=True`` (the rain-map network) a learned per-channel soft threshold
    ``relu(x - tau)`` follows, which keeps the rain maps sparse and non-negative.
    """

    def __init__(self, channels: int, num_block: int, dim_in: int, threshold: bool = False):
        super().__init__()
        self.units = nn.ModuleList(_ResidualUnit(channels, dim_in) for _ in range(num_block))
        self.tau = nn.Parameter(torch.full((1, channels, 1, 1), 0.5)) if threshold else None

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        for unit in self.units:
            x = F.relu(x + unit(x, z), inplace=True)
        if self.tau is not None:
            x = F.relu(x - self.tau, inplace=True)
        return x


def _check_shared_kernels(module: nn.Module, state: dict, prefix: str, *_) -> None:
    """Load pre-hook of a shared-kernel RCDNet: the file's ``c0`` and ``c`` must be one kernel."""
    c0, c = state.get(prefix + "c0"), state.get(prefix + "c")
    if isinstance(c0, Tensor) and isinstance(c, Tensor) and not (c0.shape == c.shape and torch.equal(c0, c)):
        diff = (c0.float() - c.float()).abs().max().item() if c0.shape == c.shape else float("nan")
        raise ModelConfigError(
            f"this RCDNet state_dict has two different rain kernels (max |c0 - c| = {diff:.3g}): it was trained "
            "with separate kernels; build the model with rain_kernels='separate' (training: --rain_kernels separate)")


# Published name -> ours. Anchored so that keys already in our naming pass unchanged.
_LEGACY_NAMES = (
    (re.compile(r"^proxNet_M_S\."), "map_nets."),
    (re.compile(r"^proxNet_B_S\."), "background_nets."),
    (re.compile(r"^proxNet_B_0\."), "init_net."),
    (re.compile(r"^proxNet_B_L\."), "final_net."),
    (re.compile(r"^((?:map_nets|background_nets)\.\d+\.|init_net\.|final_net\.)layer\."), r"\1units."),
)


class RCDNet(nn.Module):
    """Rain convolutional dictionary network with CoI-M.

    Args (reference defaults):
        inter_iter:  number of unrolled stages S (17).
        num_map:     number of rain maps / rain kernels N (32).
        num_channel: extra feature channels carried along with the background (32).
        num_block:   residual units per proximal network (4).
        dim_in:      size of the CoIC code z (128).
        rain_kernel: initial rain kernels; ``None`` uses ``streak_kernel_bank`` (9x9), or a
                     path / tensor accepted by ``load_rain_kernel`` (e.g. RCDNet's
                     ``kernel.mat``) of shape (3, num_map, k, k).
        rain_kernels: "shared" (default): the initial-stage kernel ``c0`` and the inter-stage
                     kernel ``c`` are one parameter, saved and loaded under both keys; "separate":
                     two parameters with the same start.

    forward(x, z=None): x (B,3,H,W) in [0,1], z (B,dim_in) or None -> (B,3,H,W), [0,1]
    domain, not clamped.
    """

    size_multiple: int = 1
    # The reference trains and evaluates RCDNet on 0-255 pixel values.
    value_scale: float = 255.0
    # Every convolution reads a channels-last map when the model and its input are channels-last
    # (tests/test_models_contract.py holds it to that).
    channels_last_throughout = True

    def __init__(self, inter_iter: int = 17, num_map: int = 32, num_channel: int = 32,
                 num_block: int = 4, dim_in: int = 128,
                 rain_kernel: Union[None, str, os.PathLike, Tensor] = None, rain_kernels: str = "shared"):
        super().__init__()
        if inter_iter < 1:
            raise ValueError(f"inter_iter must be >= 1, got {inter_iter}")
        if rain_kernels not in RAIN_KERNEL_MODES:
            raise ModelConfigError(f"RCDNet rain_kernels must be one of {', '.join(RAIN_KERNEL_MODES)}, "
                                   f"got {rain_kernels!r}")
        self.rain_kernels = rain_kernels
        self.inter_iter = inter_iter
        self.num_map = num_map
        self.num_channel = num_channel

        # Step sizes, used divided by 10 (the reference's way of slowing their updates).
        self.m_step = nn.Parameter(torch.ones(inter_iter - 1, 1))
        self.b_step = nn.Parameter(torch.full((inter_iter, 1), 5.0))

        kernel = streak_kernel_bank(num_map) if rain_kernel is None else load_rain_kernel(rain_kernel, num_map)
        self.kernel_padding = kernel.shape[-1] // 2
        # c0 drives only the first rain-map estimate, c all later ones. The published code wraps
        # one tensor in two nn.Parameters (one kernel in both places); "shared" registers one
        # Parameter under both names: state_dict keeps both keys, optimizers and DDP see it once,
        # and it stays one through device moves (which split the published code's two wrappers).
        self.c0 = nn.Parameter(kernel.clone())
        if rain_kernels == "shared":
            self.c = self.c0
            self.register_load_state_dict_pre_hook(_check_shared_kernels)
        else:
            self.c = nn.Parameter(kernel.clone())
        # Averaging filter producing the initial auxiliary features from the rainy image.
        self.cz = nn.Parameter(torch.full((num_channel, 3, 3, 3), 1.0 / 9))
        # Threshold of the first, sparse rain residual.
        self.tau = nn.Parameter(torch.ones(1))

        joint = num_channel + 3  # background (RGB) + auxiliary features
        self.map_nets = nn.ModuleList(
            _ProxNet(num_map, num_block, dim_in, threshold=True) for _ in range(inter_iter))
        self.background_nets = nn.ModuleList(
            _ProxNet(joint, num_block, dim_in) for _ in range(inter_iter))
        self.init_net = _ProxNet(joint, num_block, dim_in)
        self.final_net = _ProxNet(joint, num_block, dim_in)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.rain_kernels == "shared":  # conversions that replace parameters must not split the kernel
            self._parameters["c"] = self._parameters["c0"]
        return out

    @staticmethod
    def hparams_from_state(state: Mapping[str, Tensor]) -> dict:
        """What a state_dict without recorded hyper-parameters shows of them: shared rain kernels
        exactly when its ``c0`` and ``c`` are equal (published files, our older checkpoints)."""
        c0, c = state.get("c0"), state.get("c")
        if isinstance(c0, Tensor) and isinstance(c, Tensor):
            return {"rain_kernels": "shared" if c0.shape == c.shape and torch.equal(c0, c) else "separate"}
        return {}

    # ---- rain layer operators -------------------------------------------------------
    def _synthesise(self, maps: Tensor, kernel: Tensor) -> Tensor:
        """C * M: rain maps (B,N,H,W) -> rain layer (B,3,H,W)."""
        return F.conv2d(maps, kernel, padding=self.kernel_padding)

    def _correlate(self, image: Tensor, kernel: Tensor) -> Tensor:
        """C^T applied to an RGB residual: (B,3,H,W) -> (B,N,H,W)."""
        return F.conv_transpose2d(image, kernel, padding=self.kernel_padding)

    # ---- public API -----------------------------------------------------------------
    def forward_stages(self, x: Tensor, z: Optional[Tensor] = None) -> RCDNetStages:
        """Run all stages. x (B,3,H,W) in [0,1]; returns ``RCDNetStages`` on the 0-255 scale."""
        rainy = x * self.value_scale
        first_kernel, kernel = self.c0 / 10, self.c / 10

        state = self.init_net(torch.cat([rainy, F.conv2d(rainy, self.cz, padding=1)], dim=1), z)
        b0 = state[:, :3]
        background, aux = b0, state[:, 3:]
        backgrounds: list[Tensor] = []
        rain_layers: list[Tensor] = []
        maps: Optional[Tensor] = None
        rain: Optional[Tensor] = None

        for s in range(self.inter_iter):
            if maps is None:
                # Stage 1 starts the rain maps from the thresholded residual O - B0.
                sparse = F.relu(rainy - b0 - self.tau)
                maps = self.map_nets[0](self._correlate(sparse, first_kernel), z)
            else:
                # Gradient step on ||O - B - C*M||^2 with respect to M, then the prox net.
                grad = self._correlate(rain - (rainy - background), kernel)
                maps = self.map_nets[s](maps - self.m_step[s - 1] / 10 * grad, z)
            rain = self._synthesise(maps, kernel)

            eta = self.b_step[s] / 10
            blended = (1 - eta) * background + eta * (rainy - rain)
            state = self.background_nets[s](torch.cat([blended, aux], dim=1), z)
            background, aux = state[:, :3], state[:, 3:]
            rain_layers.append(rain)
            backgrounds.append(background)

        # A last proximal network refines the final background and auxiliary state jointly.
        backgrounds.append(self.final_net(state, z)[:, :3])
        return RCDNetStages(b0, backgrounds, rain_layers)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x (B,3,H,W) in [0,1], z (B,dim_in) or None -> restored (B,3,H,W), [0,1] domain."""
        return self.forward_stages(x, z).backgrounds[-1] / self.value_scale

    def remap_legacy_keys(self, state: dict) -> dict:
        """Rename published RCDNet keys (``proxNet_*``, ``.layer.``) to ours; others unchanged."""
        renamed = {}
        for key, value in state.items():
            for pattern, repl in _LEGACY_NAMES:
                key = pattern.sub(repl, key)
            renamed[key] = value
        return renamed
