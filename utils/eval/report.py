"""The evaluation's report page: ``index.html`` in the save folder, opened from the file system.

One self-contained page (inline CSS, a few lines of inline JS, relative links only, nothing
fetched from a network) with the summary table, the metric notes and, per image, a before/after
slider (rainy vs derained) beside the rainy, derained and clean previews and the image's scores.
Large sets stay usable: the page shows the first ``page_size`` images of each set and links to
further pages (``report/<set>/page-NNN.html``) and to one compact, sortable list of every image
(``report/<set>/list.html``). Images are never embedded: the pages show downsized JPEG previews
(``report/<set>/{rain,out,clean}/``, longer side ``preview_side``), loaded lazily, each linking
to its full-size file; a preview newer than its source is reused, so a rerun is fast.

Columns ``<metric>_rain`` and ``<metric>_out`` (NIQE of the rainy and of the derained image) form
a pair: where a row has both, the better one (by ``ReportColumn.better``) is marked.
"""
from __future__ import annotations

import glob
import html
import logging
import math
import os
import pathlib
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image

from utils import ROOT
from utils.errors import DataError
from utils.images import read_header, read_image, resize_to_fit
from utils.io import atomic_write, atomic_write_text

logger = logging.getLogger("coic.test")

__all__ = ["ReportColumn", "ReportSet", "write_report", "run_description", "project_commit", "PREVIEW_DIR", "PREVIEW_SIDE", "PAGE_SIZE"]

PREVIEW_DIR = "report"
PREVIEW_SIDE = 768
PAGE_SIZE = 40
JPEG_QUALITY = 90
MISSING = "—"
KINDS = (("rain", "rainy"), ("out", "derained"), ("clean", "clean"))


@dataclass
class ReportColumn:
    """One score column: ``key`` of the rows, header ``label``, ``digits`` shown, which way is better."""
    key: str
    label: str
    digits: int
    better: Optional[str] = None  # "higher", "lower" or None


@dataclass
class ReportSet:
    """One evaluated set: its (rainy, clean or None) items, the derained PNG and the score row of each."""
    name: str
    items: list[tuple[str, Optional[str]]]
    outputs: list[str]
    rows: list[dict]


@dataclass
class _Shown:
    """An image on the page: its preview (absolute path, size) and the full-size file it links to."""
    preview: str
    width: int
    height: int
    full: str


# --------------------------------------------------------------------------- previews
def _preview(source: str, target: str, side: int) -> tuple[int, int]:
    """Write (or reuse, when newer than ``source``) the JPEG preview of ``source``; its (width, height)."""
    if os.path.isfile(target) and os.path.getmtime(target) >= os.path.getmtime(str(source)):
        header = read_header(target)
        return header.width, header.height
    small = resize_to_fit(read_image(source), side)
    arr = small.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    atomic_write(target, lambda tmp: Image.fromarray(arr).save(tmp, quality=JPEG_QUALITY))
    return arr.shape[1], arr.shape[0]


def _make_previews(save_path: str, sets: list[ReportSet], slugs: list[str], side: int,
                   progress: bool) -> list[list[dict[str, Optional[_Shown]]]]:
    """Per set, per item: {kind: the image shown, or None when its file is missing or unreadable}."""
    from tqdm import tqdm

    jobs: dict[tuple, str] = {}  # (slug, kind, source, half) -> preview path; a shared clean image once
    taken: set[str] = set()
    wanted = []
    for rs, slug in zip(sets, slugs):
        per_item = []
        for (rain, clean), out in zip(rs.items, rs.outputs):
            sources = {"rain": rain, "out": out, "clean": clean}
            keys = {}
            for kind, source in sources.items():
                if source is None:
                    continue
                key = (slug, kind, str(source), getattr(source, "half", None))
                if key not in jobs:
                    stem = os.path.splitext(os.path.basename(str(source)))[0]
                    target, n = os.path.join(save_path, PREVIEW_DIR, slug, kind, stem + ".jpg"), 1
                    while target in taken:  # two sources with one stem (different folders)
                        n += 1
                        target = os.path.join(save_path, PREVIEW_DIR, slug, kind, f"{stem}-{n}.jpg")
                    taken.add(target)
                    jobs[key] = target
                keys[kind] = (key, source)
            per_item.append(keys)
        wanted.append(per_item)

    sources = {key: source for per_item in wanted for keys in per_item for key, source in keys.values()}
    failed = []

    def run(key):
        try:
            return key, _preview(sources[key], jobs[key], side)
        except (OSError, DataError) as exc:  # missing or unreadable: the page says so, the rest is shown
            failed.append(f"{sources[key]} ({exc})")
            return key, None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        sizes = dict(tqdm(pool.map(run, list(jobs)), total=len(jobs), desc="report previews", unit="img",
                          disable=not progress, dynamic_ncols=True))
    if failed:
        logger.warning("report: %d images could not be shown, e.g. %s", len(failed), failed[0])
    return [[{kind: (_Shown(jobs[key], *sizes[key], str(source)) if sizes[key] else None)
              for kind, (key, source) in keys.items()} for keys in per_item] for per_item in wanted]


# --------------------------------------------------------------------------- HTML pieces
def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _url(target: str, page_dir: str) -> str:
    """``target`` as a relative URL from a page in ``page_dir`` (escaped for an attribute)."""
    try:
        rel = os.path.relpath(os.path.abspath(target), page_dir).replace(os.sep, "/")
    except ValueError:  # another drive (Windows): no relative path exists
        return _esc(pathlib.Path(os.path.abspath(target)).as_uri())
    return _esc(urllib.parse.quote(rel, safe="/"))


def _absent(value: Optional[float]) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Optional[float], digits: int) -> Optional[str]:
    return None if _absent(value) else f"{value:.{digits}f}"


def _better_keys(row: dict, columns: list[ReportColumn]) -> set[str]:
    """Keys of ``row`` holding the better value of a rainy/derained pair (``x_rain`` vs ``x_out``)."""
    keys = {c.key: c for c in columns}
    marked = set()
    for c in columns:
        if not c.key.endswith("_rain") or c.better not in ("higher", "lower"):
            continue
        other = c.key[: -len("_rain")] + "_out"
        a, b = row.get(c.key), row.get(other)
        if other not in keys or _absent(a) or _absent(b) or a == b:
            continue
        out_wins = (b > a) == (c.better == "higher")
        marked.add(other if out_wins else c.key)
    return marked


def _cell(row: dict, column: ReportColumn, marked: set[str]) -> str:
    text = _number(row.get(column.key), column.digits)
    if text is None:
        return f'<td class="na">{MISSING}</td>'
    return f"<td><strong>{text}</strong></td>" if column.key in marked else f"<td>{text}</td>"


def _scores(row: dict, columns: list[ReportColumn]) -> str:
    marked = _better_keys(row, columns)
    parts = []
    for c in columns:
        text = _number(row.get(c.key), c.digits) or MISSING
        parts.append(f"<span>{_esc(c.label)} " + (f"<strong>{text}</strong>" if c.key in marked else f"<b>{text}</b>")
                     + "</span>")
    return " ".join(parts)


def _figure(shown: Optional[_Shown], label: str, page_dir: str) -> str:
    if shown is None:
        return f'<figure><div class="missing">{label}: missing</div><figcaption>{label}</figcaption></figure>'
    return (f'<figure><a href="{_url(shown.full, page_dir)}"><img src="{_url(shown.preview, page_dir)}" '
            f'width="{shown.width}" height="{shown.height}" loading="lazy" alt="{label}"></a>'
            f'<figcaption>{label}</figcaption></figure>')


def _slider(rain: Optional[_Shown], out: Optional[_Shown], page_dir: str) -> str:
    if rain is None or out is None:
        return ""
    return (f'<figure class="ba"><div class="cmp"><img src="{_url(out.preview, page_dir)}" width="{out.width}" '
            f'height="{out.height}" loading="lazy" alt="derained">'
            f'<img class="top" src="{_url(rain.preview, page_dir)}" '
            f'width="{rain.width}" height="{rain.height}" loading="lazy" alt="rainy">'
            '<span class="tag l">rainy</span><span class="tag r">derained</span>'
            '<input type="range" min="0" max="100" value="50" aria-label="rainy / derained split"></div>'
            '<figcaption>drag: rainy ◂ ▸ derained</figcaption></figure>')


def _card(anchor: str, row: dict, shown: dict, columns: list[ReportColumn], page_dir: str) -> str:
    figures = [_figure(shown[kind], label, page_dir) for kind, label in KINDS if kind in shown]
    return (f'<article class="card" id="{anchor}"><h3><a href="#{anchor}">{_esc(row.get("name", anchor))}</a></h3>'
            f'<p class="sc">{_scores(row, columns)}</p><div class="imgs">'
            f'{_slider(shown.get("rain"), shown.get("out"), page_dir)}{"".join(figures)}</div></article>\n')


def _page_file(save_path: str, slug: str, page: int) -> str:
    """Page ``page`` (from 1) of a set; page 1 is the set's section of index.html."""
    if page == 1:
        return os.path.join(save_path, "index.html")
    return os.path.join(save_path, PREVIEW_DIR, slug, f"page-{page:03d}.html")


def _pager(save_path: str, slug: str, pages: int, current: int, page_dir: str) -> str:
    if pages < 2:
        return ""
    links = []
    for p in range(1, pages + 1):
        url = _url(_page_file(save_path, slug, p), page_dir) + (f"#{slug}" if p == 1 else "")
        links.append(f'<span class="cur">{p}</span>' if p == current else f'<a href="{url}">{p}</a>')
    return f'<nav class="pager">pages {"".join(links)}</nav>'


def _table(rows: list[dict], columns: list[ReportColumn], first: tuple[str, str], second: tuple[str, str],
           links: Sequence[Optional[str]]) -> str:
    """A score table: the ``first`` (key, header) column linked to ``links[i]``, a ``second`` count
    column, then the score columns; the better value of each rainy/derained pair marked."""
    header = "".join(f'<th data-k="{i + 2}">{_esc(c.label)}</th>' for i, c in enumerate(columns))
    lines = []
    for row, link in zip(rows, links):
        name = _esc(row.get(first[0], ""))
        cell = f'<a href="{link}">{name}</a>' if link else name
        count = _esc(row.get(second[0], ""))
        marked = _better_keys(row, columns)
        cls = ' class="mean"' if row.get(first[0]) == "Mean" else ""
        lines.append(f'<tr{cls}><th>{cell}</th><td>{count}</td>'
                     f'{"".join(_cell(row, c, marked) for c in columns)}</tr>')
    return (f'<table><thead><tr><th>{first[1]}</th><th data-k="1">{second[1]}</th>{header}</tr></thead>'
            f'<tbody>\n{chr(10).join(lines)}\n</tbody></table>')


_CSS = """:root{color-scheme:light dark;--bg:#f5f6f8;--fg:#1c2024;--mut:#5e6975;--card:#fff;--line:#dadee3;
--acc:#2459c8;--good:#137a3e}
@media (prefers-color-scheme:dark){:root{--bg:#14171b;--fg:#e4e7eb;--mut:#97a2ae;--card:#1d2126;--line:#323941;
--acc:#82aaff;--good:#62d28f}}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1440px;margin:0 auto;padding:20px 24px 60px}h1{font-size:1.55em;margin:0 0 4px}
h2{font-size:1.2em;margin:36px 0 6px;padding-top:8px;border-top:1px solid var(--line)}a{color:var(--acc)}
.notes{color:var(--mut);margin:4px 0 16px;padding-left:18px}.mut{color:var(--mut)}
table{border-collapse:collapse;background:var(--card);border:1px solid var(--line);margin:8px 0}
th,td{padding:5px 14px;border-bottom:1px solid var(--line);text-align:right;font-variant-numeric:tabular-nums}
thead th{background:var(--bg);font-weight:600}thead th:first-child{text-align:left}
tbody th{text-align:left;font-weight:500}
tr.mean th,tr.mean td{border-top:2px solid var(--line);font-weight:600}td.na{color:var(--mut)}
td strong{color:var(--good)}th[data-k]{cursor:pointer}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 14px 14px;margin:12px 0}
.card h3{margin:0;font-size:1em;word-break:break-all}.card h3 a{color:inherit;text-decoration:none}
.sc{margin:0 0 8px;color:var(--mut);font-variant-numeric:tabular-nums}.sc span{margin-right:14px}
.sc b{color:var(--fg);font-weight:600}.sc strong{color:var(--good)}
.imgs{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px;align-items:start}
figure{margin:0}figure img{display:block;width:100%;height:auto;border-radius:6px;background:var(--line)}
figcaption{font-size:.85em;color:var(--mut);text-align:center;margin-top:3px}
.cmp{position:relative;--p:50%;border-radius:6px;overflow:hidden}.cmp img{border-radius:0}
.cmp img.top{position:absolute;inset:0;height:100%;clip-path:inset(0 calc(100% - var(--p)) 0 0)}
.cmp:after{content:"";position:absolute;top:0;bottom:0;left:var(--p);width:2px;margin-left:-1px;
background:#fff;box-shadow:0 0 4px #000;pointer-events:none}
.cmp input{position:absolute;inset:0;width:100%;height:100%;margin:0;opacity:0;cursor:ew-resize}
.cmp:focus-within{outline:2px solid var(--acc)}
.tag{position:absolute;top:6px;font-size:.75em;padding:0 6px;border-radius:4px;background:#000a;color:#fff;
pointer-events:none}.tag.l{left:6px}.tag.r{right:6px}
.missing{display:grid;place-items:center;aspect-ratio:4/3;border:1px dashed var(--line);border-radius:6px;
color:var(--mut)}
.pager{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:8px 0;color:var(--mut)}
.pager a,.pager span{padding:1px 8px;border:1px solid var(--line);border-radius:4px;text-decoration:none}
.pager span.cur{background:var(--acc);border-color:var(--acc);color:var(--card)}"""

# The slider moves the clip of the rainy image; a click on a list header sorts by that column.
_JS = """document.addEventListener("input",function(e){var t=e.target;
if(t.parentNode&&t.parentNode.className=="cmp")t.parentNode.style.setProperty("--p",t.value+"%")});
document.addEventListener("click",function(e){var h=e.target.closest("th[data-k]");if(!h)return;
var b=h.closest("table").tBodies[0],k=+h.dataset.k,up=h.dataset.up!="1";h.dataset.up=up?"1":"0";
var v=function(r){return parseFloat(r.cells[k].textContent)};
Array.from(b.rows).sort(function(x,y){var a=v(x),c=v(y);if(isNaN(a))return 1;if(isNaN(c))return -1;
return up?a-c:c-a}).forEach(function(r){b.appendChild(r)})});"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><main>\n{body}\n</main><script>{_JS}</script></body></html>\n")


def _slugs(names: list[str]) -> list[str]:
    """A safe, unique folder name (and anchor) per set name."""
    out: list[str] = []
    for k, name in enumerate(names):
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[-60:] or f"set{k + 1}"
        out.append(slug if slug not in out else f"{slug}_{k + 1}")
    return out


# --------------------------------------------------------------------------- the pages
def _write_set(save_path: str, rs: ReportSet, slug: str, images: list[dict], columns: list[ReportColumn],
               title: str, page_size: int) -> str:
    """Write the set's further pages and its list page; returns its section of index.html (page 1)."""
    folder = os.path.join(save_path, PREVIEW_DIR, slug)
    index_file, list_file = os.path.join(save_path, "index.html"), os.path.join(folder, "list.html")
    pages = max(1, math.ceil(len(rs.items) / page_size))
    anchors = [f"{slug}.{k + 1}" for k in range(len(rs.items))]  # "." is in no slug
    first_section = ""
    for p in range(1, pages + 1):
        page_dir = save_path if p == 1 else folder
        ks = range((p - 1) * page_size, min(p * page_size, len(rs.items)))
        pager = _pager(save_path, slug, pages, p, page_dir)
        section = (f'<h2 id="{slug}">{_esc(rs.name)}</h2><p class="mut">{len(rs.items)} images · '
                   f'<a href="{_url(list_file, page_dir)}">all images, sortable by score</a></p>{pager}\n'
                   + "".join(_card(anchors[k], rs.rows[k], images[k], columns, page_dir) for k in ks) + pager)
        if p == 1:
            first_section = section
        else:
            back = f'<p><a href="{_url(index_file, folder)}#{slug}">← {_esc(title)}</a></p>'
            atomic_write_text(_page_file(save_path, slug, p), _page(f"{rs.name}: page {p} · {title}", back + section))
    for stale in glob.glob(os.path.join(folder, "page-*.html")):  # pages of an earlier, larger run
        number = os.path.basename(stale)[len("page-"):-len(".html")]
        if not number.isdigit() or int(number) > pages:
            os.remove(stale)
    rows = [dict(row, **{"#": k + 1}) for k, row in enumerate(rs.rows)]
    links = [_url(_page_file(save_path, slug, k // page_size + 1), folder) + f"#{anchors[k]}" for k in range(len(rows))]
    back = f'<p><a href="{_url(index_file, folder)}#{slug}">← {_esc(title)}</a></p>'
    body = (f'{back}<h1>{_esc(rs.name)}</h1><p class="mut">{len(rows)} images; click a header to sort</p>'
            + _table(rows, columns, ("name", "Image"), ("#", "#"), links))
    atomic_write_text(list_file, _page(f"{rs.name} · {title}", body))
    return first_section


def project_commit() -> str:
    """The project's commit (``git describe --always --dirty``), or "unknown" outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def run_description(checkpoint: str, backbone: str, load_mode: str, setting, tile: Optional[int], overlap: int,
                    max_memory: Optional[int], when: Optional[str] = None, commit: Optional[str] = None,
                    compiled: bool = False) -> list[str]:
    """The report's lines saying what made it: checkpoint (or published name), backbone and mode,
    precision and layout (``setting``: a ``utils.eval.precision.Setting``; ``compiled``: ``--compile``),
    tile plan, date and commit, so two reports opened side by side say which is which."""
    import datetime

    mode = "CoIC (modulated by the encoder's z)" if load_mode == "tran" else "plain (no modulation)"
    if tile:
        tiles = f"tiles of {tile} px, overlap {overlap} px"
    elif max_memory is not None:
        tiles = f"whole images, or the largest tiles that fit {max_memory / 2 ** 30:.1f} GiB (overlap {overlap} px)"
    else:
        tiles = "whole images"
    when = when or datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [f"Model: {checkpoint} ({backbone}, {mode})", f"Setting: {setting.label}{', compiled' if compiled else ''}; {tiles}",
            f"Made: {when}, project commit {commit or project_commit()}"]


def write_report(save_path: str, sets: list[ReportSet], columns: list[ReportColumn], summary: list[dict],
                 title: str = "CoIC deraining report", notes: Sequence[str] = (), page_size: int = PAGE_SIZE,
                 preview_side: int = PREVIEW_SIDE, progress: bool = True) -> str:
    """Write ``save_path/index.html`` (atomically) with its previews and further pages; returns its path.

    ``summary``: one dict per set (and maybe a "Mean" row) with "dataset", "images" and the column
    keys; ``notes``: lines shown under the title (the metric protocols). Missing scores show "—".
    """
    for rs in sets:
        if not len(rs.items) == len(rs.outputs) == len(rs.rows):
            raise ValueError(f"set {rs.name!r}: {len(rs.items)} items, {len(rs.outputs)} outputs, {len(rs.rows)} rows")
    save_path = os.path.abspath(save_path)
    slugs = _slugs([rs.name for rs in sets])
    shown = _make_previews(save_path, sets, slugs, preview_side, progress)
    page_size = max(1, page_size)
    index = [f"<h1>{_esc(title)}</h1>"]
    if notes:
        index.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    if summary:
        set_slug = dict(zip((rs.name for rs in sets), slugs))
        links = [f"#{set_slug[s['dataset']]}" if s.get("dataset") in set_slug else None for s in summary]
        index.append(_table(summary, columns, ("dataset", "Dataset"), ("images", "Images"), links))
    for rs, slug, images in zip(sets, slugs, shown):
        index.append(_write_set(save_path, rs, slug, images, columns, title, page_size))
    path = os.path.join(save_path, "index.html")
    atomic_write_text(path, _page(title, "\n".join(index)))
    return path
