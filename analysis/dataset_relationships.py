"""Dataset relationships: mean cosine similarity of z between (and within) datasets.

    python -m analysis.dataset_relationships --feat_ext CKPT --data_paths A/test B/test C/test \\
        --save_path analysis_results/relationships

Entry (i, j) is the mean of cos(z_a, z_b) over every image a of dataset i and b of dataset j;
the diagonal is the mean over pairs of *different* images of one dataset (an image's
similarity with itself, always 1, would only inflate it). The paper reads this as: datasets
whose rain looks alike get similar codes and cluster together; a dataset's diagonal says how
consistent its rain is.

Writes ``relationships.csv`` (the matrix, a header row and a first column of dataset names),
``relationships.md`` (the matrix with image counts and each dataset's closest other dataset) and
``relationships.png`` (annotated heat-map). ``--embeddings`` reads a CSV of embeddings
(dataset,image,e0,...) instead of encoding, e.g. the one ``representation_map`` wrote.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence


import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.common import (add_embedding_args, add_output_args, gather_embeddings, logger, markdown_table,
                             new_figure, run_tool, save_figure, write_csv, write_text)
from utils.cli import Parser


def relationship_matrix(embeddings: Tensor, labels: Sequence[str]) -> tuple[list[str], Tensor, list[int]]:
    """Mean cosine similarity between the datasets named by ``labels``.

    embeddings: (N,D), any scale (rows are normalised here; z already is). labels: N dataset
    names. Returns the datasets in order of first appearance, the (K,K) float64 matrix, and the
    image count per dataset. Off-diagonal: mean over all cross pairs. Diagonal: mean over
    ordered pairs of distinct images (nan for a dataset of one image).
    """
    if embeddings.shape[0] != len(labels):
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(labels)} labels")
    names = list(dict.fromkeys(labels))
    unit = F.normalize(embeddings.to(torch.float64), dim=1)
    groups = [unit[[i for i, lab in enumerate(labels) if lab == name]] for name in names]
    k = len(names)
    matrix = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            sims = groups[i] @ groups[j].T
            if i != j:
                matrix[i, j] = sims.mean()
            else:
                n = sims.shape[0]
                matrix[i, i] = (sims.sum() - sims.diagonal().sum()) / (n * (n - 1)) if n > 1 else math.nan
    return names, matrix, [g.shape[0] for g in groups]


def closest_other(names: Sequence[str], matrix: Tensor) -> list[str]:
    """For each dataset, the other dataset with the highest mean similarity ('' when alone)."""
    out = []
    for i in range(len(names)):
        row = matrix[i].clone()
        row[i] = -math.inf
        out.append(names[int(row.argmax())] if len(names) > 1 else "")
    return out


def plot_heatmap(names: Sequence[str], matrix: Tensor, path: str, title: str) -> None:
    k = len(names)
    size = max(4.0, 0.75 * k + 2.5)
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    values = matrix.numpy()
    finite = matrix[torch.isfinite(matrix)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    image = ax.imshow(values, cmap="coolwarm", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=names, fontsize=8)
    for i in range(k):
        for j in range(k):
            v = values[i, j]
            r, g, b, _ = image.cmap(image.norm(v)) if not math.isnan(v) else (1.0, 1.0, 1.0, 1.0)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
            ax.text(j, i, "nan" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean cosine similarity")
    ax.set_title(title)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Mean cosine similarity of the encoder's codes between and within datasets (CSV, "
                           "Markdown, heat-map).")
    add_embedding_args(p)
    add_output_args(p, "analysis_results/relationships")
    return p


def run(args: argparse.Namespace, device: torch.device) -> int:
    embeddings, labels, _ = gather_embeddings(args, device, desc="relationships")
    names, matrix, counts = relationship_matrix(embeddings, labels)
    os.makedirs(args.save_path, exist_ok=True)
    write_csv(os.path.join(args.save_path, "relationships.csv"), ["dataset", *names],
              [[name, *map(float, row.tolist())] for name, row in zip(names, matrix)])
    closest = closest_other(names, matrix)
    md = markdown_table(["dataset", "images", *names, "closest other"],
                        [[name, n, *map(float, row.tolist()), c]
                         for name, n, row, c in zip(names, counts, matrix, closest)], digits=3)
    write_text(os.path.join(args.save_path, "relationships.md"),
               "Mean cosine similarity of z (diagonal: distinct images of one dataset)\n\n" + md)
    figure = os.path.join(args.save_path, "relationships.png")
    plot_heatmap(names, matrix, figure, f"mean cosine similarity ({len(labels)} images)")
    print(md, end="")
    logger.info("-> %s", figure)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
