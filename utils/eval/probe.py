"""The probe of z: rain-type accuracy, rain gap and detail gap of an encoder (``analysis.probe``).

Lives below ``utils/train`` so that the Trainer can log it during training; ``analysis/probe.py``
is its command line and says what each number means.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from utils.eval.inference import ENCODER_SIZE
from utils.images import read_image, resize_square

Encode = Callable[[Tensor], Tensor]  # (B,3,h,w) in [0,1] -> (B,D) codes
PROBE_SIGMA = 1.5  # the strongest blur of the detail-aware negatives


def format_value(v: Optional[float], percent: bool = False) -> str:
    """A probe number as printed: a share in whole percent, a gap signed to 3 decimals, — when absent."""
    return "—" if v is None else (f"{100 * v:.0f} %" if percent else f"{v:+.3f}")


@dataclass
class ProbeResult:
    accuracy: float  # rain-type accuracy of the nearest class mean on the held-out images
    scene_accuracy: Optional[float]  # the same, fitted on the held-out set's other scenes (one left out at a time)
    per_class: dict  # {class: accuracy}
    chance: float  # 1 / classes
    rain_gap: Optional[float]  # mean cos same rain, other scene - mean cos same scene, other rain
    rain_retrieval: Optional[float]  # share of held-out codes whose nearest other code has their rain type
    retrieval_chance: Optional[float]  # that share for codes that ignore rain
    detail_gap: Optional[float]  # mean cos(z, z of the flip) - mean cos(z, z of the blur)
    fit_images: int
    held_out_images: int
    scenes: int  # held-out scenes found under every class (0: no rain gap)

    def summary(self) -> str:
        """One line for a log: the accuracies, the chance and the two gaps (— where not measured)."""
        f = format_value
        return (f"rain type {f(self.accuracy, True)} (other scenes {f(self.scene_accuracy, True)}, chance "
                f"{f(self.chance, True)}), rain gap {f(self.rain_gap)}, detail gap {f(self.detail_gap)}")


def key_encoder(encoder: torch.nn.Module, feature: str = "z") -> Encode:
    """z as ``test_model.py`` computes it: the key encoder on the image resized to ``ENCODER_SIZE``.

    ``feature="feat"``: the spatial mean of the encoder's feature map instead, the representation
    the contrastive loss trains (z is the MLP head on it, trained by the restoration loss through CoI-M).
    """
    if feature not in ("z", "feat"):
        raise ValueError(f"feature must be z or feat, got {feature!r}")

    @torch.no_grad()
    def encode(x: Tensor) -> Tensor:
        z, feat = encoder.encoder_k(resize_square(x, ENCODER_SIZE))
        return z if feature == "z" else feat.mean(dim=(-2, -1))
    return encode


@torch.no_grad()
def encode_all(encode: Encode, images: Sequence[Tensor], batch: int = 16) -> Tensor:
    """(N,D) float64 unit codes of images (each (3,H,W) in [0,1], sizes may differ)."""
    codes = []
    for img in images:  # one at a time: the images may differ in size
        codes.append(encode(img[None]).double())
    return F.normalize(torch.cat(codes), dim=1) if codes else torch.zeros(0, 0, dtype=torch.float64)


def nearest_class_mean(fit: Tensor, fit_labels: Sequence[int], held: Tensor) -> Tensor:
    """Predicted class (N,) of each held-out code: the class whose mean fit code is closest in cosine."""
    labels = torch.as_tensor(list(fit_labels))
    classes = int(labels.max()) + 1
    means = torch.stack([fit[labels == c].mean(0) for c in range(classes)])
    return (held @ F.normalize(means, dim=1).T).argmax(1)


def scene_accuracy(codes: Tensor) -> float:
    """codes (T,S,D) unit: T rain types of the same S scenes. Each scene in turn is left out, the class
    means are fitted on the other scenes, and its T codes are classified by nearest class mean.

    The fit and the held-out pictures come from one split (same size, same sources), so unlike a fit on
    the training images it measures the rain type alone, not also a change of picture size between splits.
    """
    t, s, d = codes.shape
    if t < 2 or s < 2:
        raise ValueError(f"the scene-held-out accuracy needs 2 types and 2 scenes, got {t} and {s}")
    right = 0
    for left_out in range(s):
        others = [k for k in range(s) if k != left_out]
        pred = nearest_class_mean(codes[:, others].reshape(-1, d), [c for c in range(t) for _ in others],
                                  codes[:, left_out])
        right += int((pred == torch.arange(t)).sum())
    return right / (t * s)


def rain_gap(codes: Tensor) -> tuple[float, float, float]:
    """codes (T,S,D) unit: T rain types of the same S scenes. Returns (gap, retrieval, its chance).

    gap = mean cos over pairs (same type, other scene) - mean cos over pairs (same scene, other type).
    retrieval: share of codes whose nearest other code (cosine) has their type.
    """
    t, s, _ = codes.shape
    if t < 2 or s < 2:
        raise ValueError(f"the rain gap needs 2 types and 2 scenes, got {t} and {s}")
    cos = torch.einsum("asd,btd->asbt", codes, codes)  # [type a, scene s, type b, scene t]
    same_type = torch.eye(t, dtype=torch.bool)[:, None, :, None].expand(t, s, t, s)
    same_scene = torch.eye(s, dtype=torch.bool)[None, :, None, :].expand(t, s, t, s)
    gap = cos[same_type & ~same_scene].mean() - cos[same_scene & ~same_type].mean()
    flat = cos.reshape(t * s, t * s).clone()
    flat.fill_diagonal_(-math.inf)
    nearest_type = flat.argmax(1) // s
    retrieval = (nearest_type == torch.arange(t).repeat_interleave(s)).double().mean()
    return float(gap), float(retrieval), (s - 1) / (t * s - 1)


def detail_gap(encode: Encode, clean: Sequence[Tensor]) -> float:
    """mean cos(z(x), z(flip x)) - mean cos(z(x), z(blur x)) over clean images, at the encoder's size."""
    gaps = []
    for img in clean:
        x = resize_square(img[None], ENCODER_SIZE)
        blurred = gaussian_blur(x, kernel_size=11, sigma=PROBE_SIGMA)  # the training blur's kernel
        z = F.normalize(torch.cat([encode(x), encode(x.flip(-1)), encode(blurred)]).double(), dim=1)
        gaps.append(float(z[0] @ z[1] - z[0] @ z[2]))
    return sum(gaps) / len(gaps)


def probe(encode: Encode, fit: dict[str, list[Tensor]], held_out: dict[str, list[tuple[str, Tensor, Tensor]]],
          ) -> ProbeResult:
    """Probe ``encode`` (images at any size -> codes).

    fit: {class: rainy images}; held_out: {class: [(scene name, rainy, clean)]}, classes in the same
    order. Scenes whose name appears under every class give the rain gap.
    """
    names = list(fit)
    if list(held_out) != names:
        raise ValueError(f"fit and held-out classes differ: {names} vs {list(held_out)}")
    fit_z = encode_all(encode, [img for c in names for img in fit[c]])
    fit_labels = [i for i, c in enumerate(names) for _ in fit[c]]
    held_items = [(i, item) for i, c in enumerate(names) for item in held_out[c]]
    held_z = encode_all(encode, [rain for _, (_, rain, _) in held_items])
    truth = torch.tensor([i for i, _ in held_items])
    pred = nearest_class_mean(fit_z, fit_labels, held_z)
    per_class = {c: float((pred[truth == i] == i).double().mean()) for i, c in enumerate(names)}

    index = {(i, scene): k for k, (i, (scene, _, _)) in enumerate(held_items)}
    scenes = sorted(set.intersection(*[{scene for scene, _, _ in held_out[c]} for c in names]))
    gap = retrieval = retrieval_chance = by_scene = None
    if len(names) >= 2 and len(scenes) >= 2:
        codes = torch.stack([held_z[[index[(i, s)] for s in scenes]] for i in range(len(names))])
        gap, retrieval, retrieval_chance = rain_gap(codes)
        by_scene = scene_accuracy(codes)
    clean = {}
    for _, (scene, _, img) in held_items:  # one clean image per scene
        clean.setdefault(scene, img)
    return ProbeResult(
        accuracy=float((pred == truth).double().mean()), scene_accuracy=by_scene, per_class=per_class,
        chance=1 / len(names),
        rain_gap=gap, rain_retrieval=retrieval, retrieval_chance=retrieval_chance,
        detail_gap=detail_gap(encode, list(clean.values())) if clean else None,
        fit_images=len(fit_labels), held_out_images=len(held_items), scenes=len(scenes))


def read_probe_sets(fit_paths: Sequence[str], held_paths: Sequence[str], labels: Sequence[str],
                    num_fit: int, num_held: int, seed: int = 0):
    """The images of a probe: ({label: rainy fit images}, {label: [(name, rainy, clean)]}).

    ``num_fit`` fit images per folder drawn with ``seed`` (0: all); the first ``num_held`` held-out
    pairs by name (0: all), so that every folder gives the same scenes when they share names.
    """
    import random

    from utils.data.layouts import find_pairs

    fit, held = {}, {}
    for label, fit_dir, held_dir in zip(labels, fit_paths, held_paths):
        pairs = find_pairs(fit_dir)
        if 0 < num_fit < len(pairs):
            pairs = [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), num_fit))]
        fit[label] = [read_image(rain) for rain, _ in pairs]
        chosen = sorted(find_pairs(held_dir))
        chosen = chosen if num_held <= 0 else chosen[:num_held]
        held[label] = [(os.path.basename(rain), read_image(rain), read_image(clean)) for rain, clean in chosen]
    return fit, held


def log_probe(writer, encoder: torch.nn.Module, probe_sets, iteration: int, device: torch.device) -> ProbeResult:
    """Probe ``encoder`` (the key branch, in eval mode, as at test time) and log ``probe/*`` scalars."""
    was_training = encoder.training
    encoder.eval()
    encode = key_encoder(encoder)
    try:
        result = probe(lambda x: encode(x.to(device)).float().cpu(), *probe_sets)
    finally:
        encoder.train(was_training)
    writer.add_scalar("probe/rain_type_accuracy", result.accuracy, iteration)
    for name in ("scene_accuracy", "rain_gap", "rain_retrieval", "detail_gap"):
        if getattr(result, name) is not None:
            writer.add_scalar(f"probe/{name}", getattr(result, name), iteration)
    return result
