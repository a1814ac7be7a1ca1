"""Representation map: where each dataset's images land in the encoder's code space.

    python -m analysis.representation_map --feat_ext CKPT --data_paths A/test B/test C/test/norain \\
        --num_images 100 --save_path analysis_results/representation

Encodes ``--num_images`` images per dataset (z from the key encoder, on the image resized to
128, as at test time) and writes to ``--save_path``:

- ``embeddings.csv``: dataset, image, e0..e{D-1} (reusable with ``--embeddings``);
- ``projector/``: TensorBoard projector embeddings labelled by dataset and image
  (``tensorboard --logdir <save_path>/projector``, PROJECTOR tab);
- ``projection_<method>.csv`` and ``representation_<method>.png``: a 2-D projection (PCA built
  in; ``--projection tsne`` needs scikit-learn, ``umap`` needs umap-learn) coloured by dataset.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence


import torch
from torch import Tensor

from analysis.common import (AnalysisError, add_embedding_args, add_output_args, atomic_dir, dataset_colours,
                             gather_embeddings, logger, new_figure, run_tool, save_figure, write_csv,
                             write_embeddings)
from utils.cli import Parser

PROJECTIONS = ("pca", "tsne", "umap", "sphere")


def pca_2d(x: Tensor) -> Tensor:
    """x (N,D) -> (N,2) float64: coordinates on the two leading principal axes.

    Each axis' sign is fixed so that its largest loading is positive, which makes the picture
    reproducible (SVD signs are otherwise arbitrary). Missing axes (N<3 or D<2) are zeros.
    """
    x = x.to(torch.float64)
    centred = x - x.mean(dim=0, keepdim=True)
    out = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    if x.shape[0] < 2:
        return out
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = centred @ axes.T
    out[:, :proj.shape[1]] = proj
    return out


def project_2d(x: Tensor, method: str, seed: int = 0) -> Tensor:
    """x (N,D) -> (N,2) float64 with ``method`` in PROJECTIONS (t-SNE/UMAP when installed)."""
    if method == "pca":
        return pca_2d(x)
    n = x.shape[0]
    if n < 4:
        raise AnalysisError(f"--projection {method} needs at least 4 images, got {n}; use --projection pca")
    data = x.to(torch.float64).numpy()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise AnalysisError("--projection tsne needs scikit-learn: pip install scikit-learn") from None
        y = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(data)
    elif method == "umap":
        try:
            import umap
        except ImportError:
            raise AnalysisError("--projection umap needs umap-learn: pip install umap-learn") from None
        # z lives on the unit sphere: cosine distance is its natural metric.
        y = umap.UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=seed).fit_transform(data)
    else:
        raise AnalysisError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {method!r}")
    return torch.as_tensor(y, dtype=torch.float64)


def sphere_coordinates(angles: Tensor) -> Tensor:
    """(N,2) haversine coordinates (polar angle θ, azimuth φ; UMAP's ``output_metric="haversine"``)
    -> (N,3) points on the unit sphere: (sin θ cos φ, sin θ sin φ, cos θ)."""
    theta, phi = angles.to(torch.float64).unbind(1)
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], dim=1)


def longitude_latitude(points: Tensor) -> Tensor:
    """(N,3) unit vectors -> (N,2) (longitude, latitude) in degrees, for the flat view of the sphere."""
    x, y, z = points.unbind(1)
    return torch.stack([torch.atan2(y, x), torch.asin(z.clamp(-1, 1))], dim=1).rad2deg()


def project_sphere(x: Tensor, seed: int = 0) -> Tensor:
    """x (N,D) -> (N,3) on the unit sphere: UMAP with the haversine output metric, as the published
    ``Analysis/umap_vis.py`` (n_neighbors 50, min_dist 0; fewer neighbours for fewer images)."""
    n = x.shape[0]
    if n < 4:
        raise AnalysisError(f"--projection sphere needs at least 4 images, got {n}; use --projection pca")
    try:
        import umap
    except ImportError:
        raise AnalysisError("--projection sphere needs umap-learn: pip install umap-learn") from None
    mapper = umap.UMAP(n_neighbors=min(50, n - 1), min_dist=0.0, output_metric="haversine", random_state=seed)
    return sphere_coordinates(torch.as_tensor(mapper.fit_transform(x.to(torch.float64).numpy())))


def plot_sphere(points: Tensor, labels: Sequence[str], path: str, title: str) -> None:
    """(N,3) unit vectors: a 3-D scatter on the sphere and the flat longitude/latitude view."""
    order = list(dict.fromkeys(labels))
    fig = new_figure(12.0, 5.5)
    ax3d = fig.add_subplot(1, 2, 1, projection="3d")
    flat = fig.add_subplot(1, 2, 2)
    lonlat = longitude_latitude(points)
    u, v = torch.meshgrid(torch.linspace(0, 2 * math.pi, 37), torch.linspace(0, math.pi, 19), indexing="ij")
    ax3d.plot_wireframe((u.cos() * v.sin()).numpy(), (u.sin() * v.sin()).numpy(), v.cos().numpy(),
                        color="0.85", linewidth=0.4)
    for name, colour in zip(order, dataset_colours(len(order))):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        p = points[idx]
        ax3d.scatter(p[:, 0].numpy(), p[:, 1].numpy(), p[:, 2].numpy(), s=14, color=colour, depthshade=False,
                     label=f"{name} ({len(idx)})")
        flat.scatter(lonlat[idx, 0].numpy(), lonlat[idx, 1].numpy(), s=14, color=colour, edgecolors="none")
    ax3d.set_box_aspect((1, 1, 1))
    ax3d.set_axis_off()
    ax3d.set_title(title)
    flat.set_xlim(-180, 180)
    flat.set_ylim(-90, 90)
    flat.set_xlabel("longitude (°)")
    flat.set_ylabel("latitude (°)")
    flat.set_title("flat view")
    ax3d.legend(loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=8, frameon=False)
    save_figure(fig, path)


def write_projector(folder: str, embeddings: Tensor, labels: Sequence[str], names: Sequence[str]) -> None:
    """TensorBoard projector files for (N,D) ``embeddings``, metadata (dataset, image), replacing ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    with atomic_dir(folder) as tmp:
        writer = SummaryWriter(log_dir=tmp)
        # Tabs would break the projector's TSV metadata.
        meta = [[lab.replace("\t", " "), name.replace("\t", " ")] for lab, name in zip(labels, names)]
        writer.add_embedding(embeddings.float(), metadata=meta, metadata_header=["dataset", "image"], tag="z")
        writer.close()


def plot_map(points: Tensor, labels: Sequence[str], path: str, title: str, axis_name: str) -> None:
    """Scatter (N,2) ``points`` coloured by dataset label, legend outside the axes."""
    order = list(dict.fromkeys(labels))
    fig = new_figure(7.5, 5.5)
    ax = fig.add_subplot()
    for name, colour in zip(order, dataset_colours(len(order))):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        ax.scatter(points[idx, 0].numpy(), points[idx, 1].numpy(), s=18, color=colour, label=f"{name} ({len(idx)})",
                   alpha=0.85, edgecolors="none")
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Encode images of several datasets and map their codes in 2-D (TensorBoard projector "
                           "+ PNG scatter).")
    add_embedding_args(p)
    p.add_argument("--projection", choices=PROJECTIONS, default="pca",
                   help="2-D projection of the scatter (tsne: scikit-learn, umap: umap-learn); sphere: UMAP onto "
                        "the unit sphere (haversine), as the published figure (umap-learn)")
    add_output_args(p, "analysis_results/representation")
    return p


def run(args: argparse.Namespace, device: torch.device) -> int:
    embeddings, labels, names = gather_embeddings(args, device, desc="representation map")
    if args.projection == "sphere":
        return _run_sphere(args, embeddings, labels, names)
    points = project_2d(embeddings, args.projection, args.seed)
    os.makedirs(args.save_path, exist_ok=True)
    write_embeddings(os.path.join(args.save_path, "embeddings.csv"), embeddings, labels, names)
    write_csv(os.path.join(args.save_path, f"projection_{args.projection}.csv"), ["dataset", "image", "x", "y"],
              [[lab, name, *map(float, pt.tolist())] for lab, name, pt in zip(labels, names, points)])
    write_projector(os.path.join(args.save_path, "projector"), embeddings, labels, names)
    figure = os.path.join(args.save_path, f"representation_{args.projection}.png")
    what = "z" if args.embeddings is None and args.feature == "z" else "embeddings"
    plot_map(points, labels, figure, f"{what} of {len(labels)} images, {args.projection.upper()}",
             args.projection.upper())
    logger.info("%d images of %d datasets -> %s (tensorboard --logdir %s)", len(labels),
                len(set(labels)), figure, os.path.join(args.save_path, "projector"))
    return 0


def _run_sphere(args: argparse.Namespace, embeddings: Tensor, labels: list, names: list) -> int:
    points = project_sphere(embeddings, args.seed)
    os.makedirs(args.save_path, exist_ok=True)
    write_embeddings(os.path.join(args.save_path, "embeddings.csv"), embeddings, labels, names)
    lonlat = longitude_latitude(points)
    write_csv(os.path.join(args.save_path, "projection_sphere.csv"), ["dataset", "image", "x", "y", "z", "lon", "lat"],
              [[lab, name, *map(float, pt.tolist()), *map(float, ll.tolist())]
               for lab, name, pt, ll in zip(labels, names, points, lonlat)])
    write_projector(os.path.join(args.save_path, "projector"), embeddings, labels, names)
    figure = os.path.join(args.save_path, "representation_sphere.png")
    what = "z" if args.embeddings is None and args.feature == "z" else "features"
    plot_sphere(points, labels, figure, f"{what} of {len(labels)} images on the sphere (UMAP, haversine)")
    logger.info("%d images of %d datasets -> %s", len(labels), len(set(labels)), figure)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
