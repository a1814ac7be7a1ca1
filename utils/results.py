"""Result tables of an evaluation: per-image ``results.csv``, the per-set summary and its
paper-style Markdown table, each written atomically."""
from __future__ import annotations

import csv
import io
import logging
import os
from typing import Optional

from utils.io import atomic_write_text
from utils.metrics import PROTOCOLS

logger = logging.getLogger("coic.test")

__all__ = ["read_table", "write_table", "summarize", "with_mean", "format_markdown", "write_summary"]


def read_table(path: str) -> dict[str, dict]:
    """Rows of an existing results.csv by image name, scores as floats ({} when absent or unreadable)."""
    if not os.path.isfile(path):
        return {}
    rows = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                scores = [float(row[k]) if row.get(k) else None for k in ("psnr", "ssim")]
                rows[row["name"]] = {"name": row["name"], "psnr": scores[0], "ssim": scores[1],
                                     "protocol": row.get("protocol") or "coic"}
    except (OSError, csv.Error, KeyError, TypeError, ValueError):
        logger.warning("ignoring unreadable results file %s", path)
        return {}
    return rows


def _fmt(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_table(rows: list[dict], path: str) -> None:
    """Per-image results as CSV (name, psnr, ssim, protocol), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "psnr", "ssim", "protocol"])
    for r in rows:
        writer.writerow([r["name"], _fmt(r["psnr"], 4), _fmt(r["ssim"], 6), r.get("protocol", "coic")])
    atomic_write_text(path, buf.getvalue())


def summarize(name: str, rows: list[dict]) -> dict:
    """One line of the summary table: the set's mean PSNR/SSIM over its scored images."""
    scored = [r for r in rows if r["psnr"] is not None]
    return {"dataset": name, "images": len(rows), "scored": len(scored),
            "psnr": sum(r["psnr"] for r in scored) / len(scored) if scored else None,
            "ssim": sum(r["ssim"] for r in scored) / len(scored) if scored else None}


def with_mean(summary: list[dict]) -> list[dict]:
    """The summary plus the paper's "mean" line: the unweighted mean of the scored sets' means."""
    scored = [s for s in summary if s["psnr"] is not None]
    if len(scored) < 2:
        return list(summary)
    mean = {"dataset": "Mean", "images": sum(s["images"] for s in scored), "scored": sum(s["scored"] for s in scored),
            "psnr": sum(s["psnr"] for s in scored) / len(scored), "ssim": sum(s["ssim"] for s in scored) / len(scored)}
    return list(summary) + [mean]


def format_markdown(summary: list[dict], protocol: str) -> str:
    """The paper-style table (Markdown): one line per test set and the mean."""
    lines = [f"Metric protocol: `{protocol}` ({PROTOCOLS[protocol].description})", "",
             "| Dataset | Images | PSNR | SSIM |", "|---|---:|---:|---:|"]
    for s in summary:
        psnr = "—" if s["psnr"] is None else f"{s['psnr']:.2f}"
        ssim = "—" if s["ssim"] is None else f"{s['ssim']:.4f}"
        lines.append(f"| {s['dataset']} | {s['images']} | {psnr} | {ssim} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: list[dict], save_path: str, protocol: str) -> None:
    """``summary.csv`` and ``summary.md`` in ``save_path``, each written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "images", "psnr", "ssim", "protocol"])
    for s in summary:
        writer.writerow([s["dataset"], s["images"], _fmt(s["psnr"], 4), _fmt(s["ssim"], 6), protocol])
    atomic_write_text(os.path.join(save_path, "summary.csv"), buf.getvalue())
    atomic_write_text(os.path.join(save_path, "summary.md"), format_markdown(summary, protocol))
