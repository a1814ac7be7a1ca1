"""The tables of ``reproduce.py``: ours beside the paper's, from the evaluations' ``summary.csv`` files.

``results/<experiment>/table.md`` is in the paper's layout (one row per model and source, one column
per test set) with the metric protocol of every column; ``table.csv`` holds the same cells one per
line (experiment, backbone, model, seed, source, testset, psnr, ssim, niqe_rain, niqe_out, protocol,
reference). A cell is empty where there is no result yet, or where neither the paper nor the
published README gives a value.
"""
from __future__ import annotations

import csv
import io
import os
import statistics
from typing import Optional, Sequence

from utils.data.specs import dataset_spec
from utils.errors import DataError
from utils.io import atomic_write_text
from utils.paper.experiments import PAPER_PROTOCOL, PAPER_RESULTS, PAPER_SOURCES, Experiment
from utils.tables import markdown_row, markdown_table

__all__ = ["read_summary", "summary_name", "write_tables", "CSV_COLUMNS"]

CSV_COLUMNS = ("experiment", "backbone", "model", "seed", "source", "testset", "psnr", "ssim", "niqe_rain",
               "niqe_out", "protocol", "reference")


def summary_name(name: str) -> str:
    """The name ``test_model.py --testset`` gives a set in summary.csv (canonical for public datasets)."""
    try:
        return dataset_spec(name).name
    except DataError:
        return name


def read_summary(path: str) -> dict[str, dict[str, str]]:
    """Rows of a summary.csv by dataset ({} when absent or unreadable); values as written."""
    try:
        with open(path, newline="") as f:
            return {row["dataset"]: row for row in csv.DictReader(f) if row.get("dataset")}
    except (OSError, csv.Error, KeyError):
        return {}


def _num(row: Optional[dict], key: str) -> Optional[float]:
    try:
        return float(row[key]) if row and row.get(key) not in (None, "") else None
    except ValueError:
        return None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _cell(psnr: Optional[float], ssim: Optional[float] = None, signed: bool = False) -> str:
    if psnr is None:
        return ""
    text = f"{psnr:+.2f}" if signed else f"{psnr:.2f}"
    if ssim is not None:
        text += f" / {ssim:+.4f}" if signed else f" / {ssim:.4f}"
    return text


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


class _Table:
    """Markdown rows and CSV records built side by side."""

    def __init__(self, exp: Experiment, columns: Sequence[str]):
        self.exp, self.columns, self.md, self.records = exp, list(columns), [], []

    def row(self, label: Sequence[str], cells: Sequence[str]) -> None:
        self.md.append(markdown_row([*label, *cells]))

    def record(self, **values) -> None:
        self.records.append({k: "" if values.get(k) is None else values[k] for k in CSV_COLUMNS})

    def header(self, label: Sequence[str], extra: Sequence[str] = ("Mean",)) -> None:
        self.md += markdown_table([*label, *self.columns, *extra], [])

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        return buf.getvalue()


def _fmt(v: Optional[float], digits: int) -> Optional[str]:
    return None if v is None else f"{v:.{digits}f}"


# ------------------------------------------------------------------ paper layout (main, spa)
def _paper_table(exp: Experiment, runs, summaries: dict[str, str], protocol: str) -> _Table:
    sets = [summary_name(s) for s in exp.evaluation.test_sets]
    t = _Table(exp, sets)
    t.header(["Backbone", "Model", "Source"])
    protocols: dict[str, set] = {s: set() for s in sets}
    mismatch = False
    for backbone in dict.fromkeys(r.backbone for r in runs):
        psnr_of: dict[tuple[str, str], list] = {}
        for run in (r for r in runs if r.backbone == backbone):
            rows = read_summary(summaries[run.name])
            ours = [(_num(rows.get(s), "psnr"), _num(rows.get(s), "ssim")) for s in sets]
            paper = [PAPER_RESULTS.get((exp.name, backbone, run.variant.key, s)) for s in sets]
            paper_psnr = [p.psnr if p else None for p in paper]
            diffs = []
            for s, (o, o_ssim), p in zip(sets, ours, paper):
                used = (rows.get(s) or {}).get("protocol")
                if used:
                    protocols[s].add(used)
                bad = p is not None and used not in (None, PAPER_PROTOCOL)
                mismatch |= bad
                d = _diff(o, p.psnr if p else None)
                diffs.append(_cell(d, signed=True) + (" ⚠" if bad and d is not None else ""))
                t.record(experiment=exp.name, backbone=backbone, model=run.variant.label, source="ours", testset=s,
                         psnr=_fmt(o, 4), ssim=_fmt(o_ssim, 6), protocol=used, reference=summaries[run.name])
                if p is not None:
                    t.record(experiment=exp.name, backbone=backbone, model=run.variant.label, source="paper",
                             testset=s, psnr=_fmt(p.psnr, 2), ssim=_fmt(p.ssim, 4), protocol=PAPER_PROTOCOL,
                             reference=PAPER_SOURCES.get(exp.name, ""))
                    t.record(experiment=exp.name, backbone=backbone, model=run.variant.label,
                             source="ours - paper", testset=s, psnr=_fmt(d, 4), protocol=used)
            o_mean, p_mean = _mean([o for o, _ in ours]), _mean(paper_psnr)
            t.row([backbone, run.variant.label, "ours"], [_cell(*o) for o in ours] + [_cell(o_mean)])
            t.row(["", "", "paper"], [_cell(p) for p in paper_psnr] + [_cell(p_mean)])
            t.row(["", "", "ours − paper"], diffs + [_cell(_diff(o_mean, p_mean), signed=True)])
            psnr_of[(run.variant.key, "ours")] = [o for o, _ in ours] + [o_mean]
            psnr_of[(run.variant.key, "paper")] = paper_psnr + [p_mean]
        if ("plain", "ours") in psnr_of and ("coic", "ours") in psnr_of:
            for source in ("ours", "paper"):
                gains = [_diff(c, p) for c, p in zip(psnr_of[("coic", source)], psnr_of[("plain", source)])]
                t.row([backbone, "CoIC gain (w/ − w/o)", source], [_cell(g, signed=True) for g in gains])
                for s, g in zip(sets, gains):
                    if g is not None:
                        t.record(experiment=exp.name, backbone=backbone, model="CoIC gain", source=source,
                                 testset=s, psnr=_fmt(g, 4))
    protocol_table = markdown_table(["", *sets], [
        ["ours", *(", ".join(sorted(protocols[s])) or protocol for s in sets)],
        ["paper", *(PAPER_PROTOCOL if any(k[0] == exp.name and k[3] == s for k in PAPER_RESULTS) else ""
                    for s in sets)]])
    # its empty corner cell has always been written "| |"
    protocol_table[0] = protocol_table[0].replace("|  |", "| |", 1)
    t.md += ["", "Metric protocol per column (`utils/metrics.py`):", "", *protocol_table]
    if mismatch:
        t.md += ["", "⚠ ours were scored with another protocol than the paper's: those differences compare "
                     "different metrics."]
    return t


# ------------------------------------------------------------------ the demo: seeds and their spread
def _seeds_table(exp: Experiment, runs, summaries: dict[str, str]) -> _Table:
    sets = [summary_name(s) for s in exp.evaluation.test_sets]
    t = _Table(exp, sets)
    t.header(["Backbone", "Model", "Seed"])
    means: dict[tuple[str, str], list] = {}
    spreads: dict[tuple[str, str], list] = {}
    per_variant: dict[str, dict[str, dict]] = {}  # backbone -> variant -> seed -> PSNRs (sets..., mean)
    for backbone in dict.fromkeys(r.backbone for r in runs):
        for variant in dict.fromkeys(r.variant for r in runs if r.backbone == backbone):
            per_seed = []
            for run in (r for r in runs if r.backbone == backbone and r.variant == variant):
                rows = read_summary(summaries[run.name])
                ours = [(_num(rows.get(s), "psnr"), _num(rows.get(s), "ssim")) for s in sets]
                psnrs = [o for o, _ in ours] + [_mean([o for o, _ in ours])]
                per_seed.append(psnrs)
                per_variant.setdefault(backbone, {}).setdefault(variant.key, {})[run.seed] = psnrs
                t.row([backbone, variant.label, str(run.seed)], [_cell(*o) for o in ours] + [_cell(psnrs[-1])])
                for s, (o, o_ssim) in zip(sets, ours):
                    t.record(experiment=exp.name, backbone=backbone, model=variant.label, seed=run.seed, source="ours",
                             testset=s, psnr=_fmt(o, 4), ssim=_fmt(o_ssim, 6),
                             protocol=(rows.get(s) or {}).get("protocol"), reference=summaries[run.name])
            columns = list(zip(*per_seed))
            means[(backbone, variant.key)] = [_mean(list(c)) for c in columns]
            spreads[(backbone, variant.key)] = [max(c) - min(c) if all(v is not None for v in c) else None
                                                for c in columns]
            t.row(["", variant.label, "mean"], [_cell(m) for m in means[(backbone, variant.key)]])
            t.row(["", variant.label, "spread (max − min)"], [_cell(d) for d in spreads[(backbone, variant.key)]])
        if (backbone, "plain") in means and (backbone, "coic") in means:
            _paired_rows(t, exp, backbone, sets, per_variant[backbone])
    return t


def _paired_rows(t: _Table, exp: Experiment, backbone: str, sets: Sequence[str], psnr: dict[str, dict]) -> None:
    """CoIC against the plain backbone, seed by seed: both runs of a seed share its data order and
    initialisation, so their difference is the effect of CoIC plus noise, and the spread of the
    differences over seeds says how much of it is noise."""
    seeds = [s for s in psnr["coic"] if s in psnr["plain"]]
    diffs = {s: [_diff(c, p) for c, p in zip(psnr["coic"][s], psnr["plain"][s])] for s in seeds}
    for s in seeds:
        t.row([backbone, "CoIC − w/o (paired)", str(s)], [_cell(d, signed=True) for d in diffs[s]])
    columns = list(zip(*diffs.values())) if diffs else []
    complete = [list(c) if all(v is not None for v in c) else None for c in columns]
    gains = [_mean(c) if c else None for c in complete]
    sds = [statistics.stdev(c) if c and len(c) > 1 else None for c in complete]
    t.row([backbone, "CoIC gain (w/ − w/o)", "mean"], [_cell(g, signed=True) for g in gains])
    t.row(["", "CoIC gain (w/ − w/o)", "sd over seeds"], [_cell(d) for d in sds])
    for s, g in zip(sets, gains):
        if g is not None:
            t.record(experiment=exp.name, backbone=backbone, model="CoIC gain", seed="mean", source="ours",
                     testset=s, psnr=_fmt(g, 4))
    if not complete or complete[-1] is None:
        return
    overall, n = complete[-1], len(complete[-1])
    better = sum(d > 0 for d in overall)
    text = (f"{backbone}: over {n} seed{'s' if n > 1 else ''}, CoIC changes the mean PSNR by "
            f"{gains[-1]:+.2f} dB (better on {better} of {n} seeds)")
    if sds[-1] is not None:
        se = sds[-1] / n ** 0.5
        verdict = ("larger than two standard errors: at this training length CoIC "
                   + ("helps" if gains[-1] > 0 else "hurts")) if abs(gains[-1]) > 2 * se else \
            "within two standard errors of zero: at this training length the seeds cannot tell CoIC from the plain backbone"
        text += f"; the standard error of that mean is {se:.2f} dB, so the difference is {verdict}"
    t.md += ["", text + "."]


# ------------------------------------------------------------------ real rain: NIQE
def _niqe_table(exp: Experiment, runs, summaries: dict[str, str]) -> _Table:
    sets = [summary_name(s) for s in exp.evaluation.test_sets]
    t = _Table(exp, [f"{s} NIQE {kind}" for s in sets for kind in ("rainy", "derained")])
    t.header(["Backbone", "Model"], extra=())
    channels: set = set()
    for run in runs:
        rows = read_summary(summaries[run.name])
        cells = []
        for s in sets:
            rain, out = _num(rows.get(s), "niqe_rain"), _num(rows.get(s), "niqe_out")
            cells += [_fmt(rain, 3) or "", _fmt(out, 3) or ""]
            channel = (rows.get(s) or {}).get("niqe_channel") or ""
            channels.add(channel)
            t.record(experiment=exp.name, backbone=run.backbone, model=run.variant.label, source="ours", testset=s,
                     niqe_rain=_fmt(rain, 4), niqe_out=_fmt(out, 4), protocol=f"niqe {channel}".strip(),
                     reference=summaries[run.name])
        t.row([run.backbone, run.variant.label], cells)
    used = ", ".join(sorted(c for c in channels if c)) or "not yet scored"
    t.md += ["", f"NIQE (MATLAB niqe_release, `utils/niqe.py`) on the `{used}` channel; lower is better; no ground "
                 "truth. Empty cells: no summary.csv with NIQE columns yet (`test_model.py --metrics niqe`)."]
    return t


# ------------------------------------------------------------------ analysis: an index of the outputs
def _analysis_table(exp: Experiment, runs, folders: dict[str, dict[str, str]]) -> _Table:
    t = _Table(exp, [])
    for run in runs:
        t.md += [f"## {run.name}", ""]
        for tool in exp.analyses:
            folder = folders[run.name][tool.tool]
            present = [f for f in tool.outputs if os.path.isfile(os.path.join(folder, f))]
            t.md += [f"### {tool.title}", "", f"`{folder}`: " + (", ".join(f"`{f}`" for f in present) or
                                                               "not run yet"), ""]
            for f in present:
                t.record(experiment=exp.name, backbone=run.backbone, model=run.variant.label, source="ours",
                         testset=",".join(tool.data), reference=os.path.join(folder, f))
            if tool.summary and tool.summary in present:
                with open(os.path.join(folder, tool.summary)) as f:
                    t.md += [f.read().strip(), ""]
    return t


def write_tables(exp: Experiment, runs, summaries: dict[str, str], table_dir: str, protocol: str,
                 analysis_folders: Optional[dict[str, dict[str, str]]] = None) -> str:
    """Build the experiment's table from what exists; write ``table.md`` and ``table.csv`` atomically
    in ``table_dir``; return the Markdown. ``summaries``: run name -> its summary.csv."""
    if exp.table == "seeds":
        t = _seeds_table(exp, runs, summaries)
    elif exp.table == "niqe":
        t = _niqe_table(exp, runs, summaries)
    elif exp.table == "analysis":
        t = _analysis_table(exp, runs, analysis_folders or {})
    else:
        t = _paper_table(exp, runs, summaries, protocol)
    intro = [f"# {exp.name}: {exp.title}", ""]
    if exp.table in ("paper", "seeds"):
        intro += [f"PSNR (dB) / SSIM on the Y channel, ours under `{protocol}`"
                  + (f"; the paper's values: {PAPER_SOURCES[exp.name]}" if exp.name in PAPER_SOURCES else "")
                  + ". Differences are in PSNR; empty cells: no result yet, or no published value.", ""]
    elif exp.name in PAPER_SOURCES:
        intro += [f"Paper: {PAPER_SOURCES[exp.name]}.", ""]
    md = "\n".join(intro + t.md) + "\n"
    atomic_write_text(os.path.join(table_dir, "table.md"), md)
    atomic_write_text(os.path.join(table_dir, "table.csv"), t.csv())
    return md
