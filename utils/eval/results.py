"""Result tables of an evaluation: per-image ``results.csv``, the per-set summary and its
paper-style Markdown table, each written atomically.

Score columns: ``psnr``/``ssim`` (against the clean image, under the row's ``protocol``) and
``niqe_rain``/``niqe_out`` (no reference: NIQE of the rainy input and of the derained output,
on the row's ``niqe_channel``). A row or a set has the columns it can have; the others are empty.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Optional

from utils.io import atomic_write_text
from utils.metrics import METRICS, PROTOCOLS, better_value
from utils.tables import markdown_table, write_csv

logger = logging.getLogger("coic.test")

__all__ = ["SCORE_COLUMNS", "read_table", "write_table", "summarize", "with_mean", "format_markdown",
           "write_summary", "protocol_notes"]

SCORE_COLUMNS = ("psnr", "ssim", "niqe_rain", "niqe_out")
_DIGITS = {"psnr": 4, "ssim": 6, "niqe_rain": 4, "niqe_out": 4, "niqe_change": 4}


def read_table(path: str) -> dict[str, dict]:
    """Rows of an existing results.csv by image name, scores as floats ({} when absent or unreadable)."""
    if not os.path.isfile(path):
        return {}
    rows = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("error"):  # not derained: nothing to reuse
                    continue
                scores = {k: float(row[k]) if row.get(k) else None for k in SCORE_COLUMNS}
                rows[row["name"]] = {"name": row["name"], **scores, "protocol": row.get("protocol") or "coic",
                                     "niqe_channel": row.get("niqe_channel") or "y"}
    except (OSError, csv.Error, KeyError, TypeError, ValueError):
        logger.warning("ignoring unreadable results file %s", path)
        return {}
    return rows


def _fmt(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_table(rows: list[dict], path: str) -> None:
    """Per-image results as CSV (name, psnr, ssim, niqe_rain, niqe_out, protocol, niqe_channel), atomically;
    an ``error`` column (why the image was not derained) when some row has one."""
    errors = any(r.get("error") for r in rows)
    write_csv(path, ["name", *SCORE_COLUMNS, "protocol", "niqe_channel"] + (["error"] if errors else []),
              [[r["name"], *(_fmt(r.get(k), _DIGITS[k]) for k in SCORE_COLUMNS), r.get("protocol", "coic"),
                r.get("niqe_channel", "y")] + ([r.get("error") or ""] if errors else []) for r in rows])


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(name: str, rows: list[dict]) -> dict:
    """One line of the summary table: the set's mean of each score over the images that have it (rows
    with an ``error``, images that could not be read, are not counted)."""
    rows = [r for r in rows if not r.get("error")]
    line = {"dataset": name, "images": len(rows), "scored": sum(r.get("psnr") is not None for r in rows),
            "niqe_scored": sum(r.get("niqe_out") is not None for r in rows)}
    line.update({k: _mean([r.get(k) for r in rows]) for k in SCORE_COLUMNS})
    # the change over the images scored on both sides
    both = [r for r in rows if r.get("niqe_rain") is not None and r.get("niqe_out") is not None]
    line["niqe_change"] = _mean([r["niqe_out"] - r["niqe_rain"] for r in both])
    return line


def with_mean(summary: list[dict]) -> list[dict]:
    """The summary plus the paper's "mean" line: per column, the unweighted mean of the sets that have
    it (empty where fewer than two sets have it); its image count is that of the sets it averages."""
    columns = (*SCORE_COLUMNS, "niqe_change")
    averaged = {k: [s for s in summary if s.get(k) is not None] for k in columns}
    averaged = {k: sets for k, sets in averaged.items() if len(sets) >= 2}
    if not averaged:
        return list(summary)
    members = [s for s in summary if any(s in sets for sets in averaged.values())]
    mean = {"dataset": "Mean", "images": sum(s["images"] for s in members),
            "scored": sum(s["scored"] for s in members), "niqe_scored": sum(s.get("niqe_scored", 0) for s in members)}
    mean.update({k: _mean([s[k] for s in averaged[k]]) if k in averaged else None for k in columns})
    return list(summary) + [mean]


def protocol_notes(protocol: str, niqe_channel: Optional[str]) -> list[str]:
    """One line per metric family shown: where its numbers come from."""
    notes = [f"Metric protocol: `{protocol}` ({PROTOCOLS[protocol].description})"]
    if niqe_channel:
        which = "Y of rgb2ycbcr" if niqe_channel == "y" else "luminance 0.299R+0.587G+0.114B (pyiqa's default)"
        notes.append(f"NIQE: MATLAB niqe_release on the {which}; lower is better")
    return notes


def _cell(value: Optional[float], digits: int, bold: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return f"**{text}**" if bold else text


def format_markdown(summary: list[dict], protocol: str, niqe_channel: Optional[str] = "y") -> str:
    """The paper-style table (Markdown): one line per test set and the mean, with the columns some set has.
    NIQE columns show the rainy input and the derained output, the better of the two in bold."""
    has_ref = any(s.get("psnr") is not None for s in summary)
    has_niqe = any(s.get("niqe_out") is not None for s in summary)
    header, align = ["Dataset", "Images"], [None, "right"]
    if has_ref or not has_niqe:
        header += ["PSNR", "SSIM"]
        align += ["right", "right"]
    if has_niqe:
        header += ["NIQE rainy", "NIQE derained", "ΔNIQE"]
        align += ["right"] * 3
    notes = protocol_notes(protocol, niqe_channel if has_niqe else None)
    digits = METRICS["niqe"].digits
    rows = []
    for s in summary:
        cells = [str(s["dataset"]), str(s["images"])]
        if has_ref or not has_niqe:
            cells += [_cell(s.get("psnr"), METRICS["psnr"].digits), _cell(s.get("ssim"), METRICS["ssim"].digits)]
        if has_niqe:
            rain, out = s.get("niqe_rain"), s.get("niqe_out")
            best = None if rain is None or out is None else better_value("niqe", rain, out)
            cells += [_cell(rain, digits, rain == best and out != rain), _cell(out, digits, out == best and out != rain),
                      "—" if s.get("niqe_change") is None else f"{s['niqe_change']:+.{digits}f}"]
        rows.append(cells)
    return "\n".join([*notes, "", *markdown_table(header, rows, align)]) + "\n"


def write_summary(summary: list[dict], save_path: str, protocol: str, niqe_channel: str = "y") -> None:
    """``summary.csv`` and ``summary.md`` in ``save_path``, each written atomically."""
    columns = (*SCORE_COLUMNS, "niqe_change")
    write_csv(os.path.join(save_path, "summary.csv"), ["dataset", "images", *columns, "protocol", "niqe_channel"],
              [[s["dataset"], s["images"], *(_fmt(s.get(k), _DIGITS[k]) for k in columns), protocol, niqe_channel]
               for s in summary])
    atomic_write_text(os.path.join(save_path, "summary.md"), format_markdown(summary, protocol, niqe_channel))
