"""The report page (utils/eval/report.py), read back with the standard library's HTML parser: every image
shown and linked, links relative and resolving, scores as formatted, names escaped, nothing from a
network, small pages for many images, previews reused."""
import html.parser
import logging
import os
import re
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from utils.eval.report import ReportColumn, ReportSet, write_report

COLUMNS = [ReportColumn("psnr", "PSNR", 2, "higher"), ReportColumn("ssim", "SSIM", 4, "higher"),
           ReportColumn("niqe_rain", "NIQE (rainy)", 3, "lower"),
           ReportColumn("niqe_out", "NIQE (derained)", 3, "lower")]
ODD = 'a&b <i>"x"\' #1 %41.png'  # escaped in the page, quoted in a URL ('#', '%')
ODD_SET = 'Real <b>rain</b> & "more"'


class Page(html.parser.HTMLParser):
    """Every tag's attributes, the text, and the text inside each ``<article id=...>`` and table row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.ids = [], [], set()
        self.articles, self.rows = {}, []
        self._article, self._row, self._strong = None, None, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "article":
            self._article = attrs["id"]
            self.articles[self._article] = []
        if tag == "tr":
            self._row = []
        if tag == "strong":
            self._strong += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self._article = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "strong":
            self._strong -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._article is not None:
            self.articles[self._article].append(data)
        if self._row is not None and data.strip():
            self._row.append((data.strip(), self._strong > 0))


def parse(path):
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def _write(path, size=(12, 16), value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def evaluation(tmp_path):
    """Two sets: pairs (two rainy images share one clean, as DDN's do) and rainy-only images."""
    data, save = tmp_path / "data", tmp_path / "results"
    pairs = ReportSet("Rain200H", [], [], [])
    clean_shared = _write(str(data / "A" / "norain" / "1.png"), value=1)
    for k, name in enumerate(["1_1.png", "1_2.png", "2.png"]):
        rain = _write(str(data / "A" / "rain" / name), value=10 + k)
        clean = clean_shared if k < 2 else _write(str(data / "A" / "norain" / "2.png"), value=2)
        pairs.items.append((rain, clean))
        pairs.outputs.append(_write(str(save / "Rain200H" / name), value=20 + k))
    pairs.rows = [{"name": "1_1.png", "psnr": 31.23456, "ssim": 0.912345, "niqe_rain": 6.0, "niqe_out": 4.5},
                  {"name": "1_2.png", "psnr": 27.5, "ssim": None, "niqe_rain": 3.25, "niqe_out": 5.125},
                  {"name": "2.png", "psnr": 40.0, "ssim": 0.99999, "niqe_rain": 4.0, "niqe_out": 4.0}]
    real = ReportSet(ODD_SET, [], [], [])
    for k, name in enumerate([ODD, "b.jpg"]):
        real.items.append((_write(str(data / "B" / name), value=30 + k), None))
        real.outputs.append(_write(str(save / "real" / (os.path.splitext(name)[0] + ".png")), value=40 + k))
        real.rows.append({"name": name, "psnr": None, "ssim": None, "niqe_rain": 5.5 + k, "niqe_out": 4.25})
    summary = [{"dataset": "Rain200H", "images": 3, "psnr": 32.9, "ssim": 0.95, "niqe_rain": 4.4, "niqe_out": 4.6},
               {"dataset": ODD_SET, "images": 2, "psnr": None, "ssim": None, "niqe_rain": 6.0, "niqe_out": 4.25},
               {"dataset": "Mean", "images": 5, "psnr": 32.9, "ssim": 0.95, "niqe_rain": 5.0, "niqe_out": 5.0}]
    return str(save), [pairs, real], summary


def _pages(index):
    """index.html and every HTML page it links to, directly or through those pages."""
    todo, seen = [os.path.realpath(index)], {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = parse(path)
        for _, attrs in seen[path].tags:
            href = urllib.parse.unquote(attrs.get("href", "").split("#")[0])
            if href.endswith(".html"):
                todo.append(os.path.realpath(os.path.join(os.path.dirname(path), href)))
    return seen


def _targets(pages, attr):
    """Files named by ``attr`` (src/href) on all pages, resolved."""
    return {os.path.realpath(os.path.join(os.path.dirname(p), urllib.parse.unquote(a[attr].split("#")[0])))
            for p, page in pages.items() for _, a in page.tags if a.get(attr) and not a[attr].startswith("#")}


def test_every_image_is_shown_and_linked(evaluation):
    save, sets, summary = evaluation
    pages = _pages(write_report(save, sets, COLUMNS, summary, progress=False))
    hrefs, srcs = _targets(pages, "href"), _targets(pages, "src")
    for rs in sets:
        for (rain, clean), out in zip(rs.items, rs.outputs):
            for path in [rain, out] + ([clean] if clean else []):
                assert os.path.realpath(path) in hrefs
    previews = [s for s in srcs if "report" in s]
    # one preview per distinct image: 3 rainy + 3 derained + 2 clean (one shared), 2 rainy + 2 derained
    assert len(previews) == len(srcs) == 12
    assert all(s.endswith(".jpg") for s in previews)
    rainy_only = [a for a in pages[os.path.realpath(os.path.join(save, "index.html"))].tags
                  if a[0] == "img" and a[1].get("alt") == "clean"]
    assert len(rainy_only) == 3  # the clean figures of the first set only


def test_links_are_relative_and_resolve(evaluation):
    save, sets, summary = evaluation
    pages = _pages(write_report(save, sets, COLUMNS, summary, progress=False))
    assert len(pages) == 3  # index and each set's list page
    for path, page in pages.items():
        for tag, attrs in page.tags:
            for attr in ("src", "href"):
                url = attrs.get(attr)
                if url is None:
                    continue
                assert urllib.parse.urlsplit(url).scheme == "" and not url.startswith("/"), url
                target, _, fragment = url.partition("#")
                target = os.path.join(os.path.dirname(path), urllib.parse.unquote(target)) if target else path
                assert os.path.isfile(target), url
                if fragment:
                    assert fragment in _pages(target)[os.path.realpath(target)].ids, url
            if tag == "img":
                assert attrs.get("loading") == "lazy"


def test_no_network_and_small_pages_for_many_images(tmp_path):
    rain, out = _write(str(tmp_path / "in" / "r.png")), _write(str(tmp_path / "in" / "o.png"))
    n = 500
    rows = [{"name": f"img_{k:04d}.png", "psnr": 30 + k / 1000, "ssim": 0.9, "niqe_rain": 5.0, "niqe_out": 4.0}
            for k in range(n)]
    rs = ReportSet("Many", [(rain, rain)] * n, [out] * n, rows)
    index = write_report(str(tmp_path / "res"), [rs], COLUMNS, [], page_size=50, progress=False)
    pages = list(_pages(index))
    assert len(pages) == 1 + 9 + 1  # index (first 50), pages 2..10, the list
    total = sum(os.path.getsize(p) for p in pages)
    assert os.path.getsize(index) < 70_000  # 50 cards, whatever the set's size
    assert total / n < 1_600, f"{total / n:.0f} bytes per image"
    for p in pages:
        source = open(p, encoding="utf-8").read()
        assert not re.search(r"https?:|//|data:|@import|url\(", source), p
        assert "base64" not in source
    seen = [a.get("id") for p in pages for t, a in parse(p).tags if t == "article"]
    assert sorted(seen) == sorted(f"Many.{k + 1}" for k in range(n))  # each image on exactly one page


def test_scores_missing_values_and_escaping(evaluation):
    save, sets, summary = evaluation
    index = write_report(save, sets, COLUMNS, summary, progress=False)
    page = parse(index)
    for rs in sets:
        cards = [c for c in page.articles.values() if c]
        for row in rs.rows:
            text = "".join(next(c for c in cards if c[0] == row["name"]))
            for c in COLUMNS:
                shown = "—" if row[c.key] is None else ("%.*f" % (c.digits, row[c.key]))
                assert f"{c.label} {shown}" in text, (row["name"], c.key, text)
    assert "PSNR 31.23" in "".join(page.text) and "SSIM 0.9123" in "".join(page.text)
    source = open(index, encoding="utf-8").read()
    assert ODD not in source and "<i>" not in source and "<b>rain" not in source
    assert ODD in page.text and ODD_SET in page.text  # shown as written, once unescaped


def test_better_value_is_marked(evaluation):
    save, sets, summary = evaluation
    index = write_report(save, sets, COLUMNS, summary, progress=False)
    rows = {cells[0][0]: cells for cells in parse(index).rows}
    marked = {name: [text for text, strong in cells if strong] for name, cells in rows.items()}
    assert marked["Rain200H"] == ["4.400"]   # NIQE: rainy 4.4 < derained 4.6, lower is better
    assert marked[ODD_SET] == ["4.250"]      # derained better
    assert marked["Mean"] == []              # a tie marks neither
    assert [t for t, _ in rows["Rain200H"]] == ["Rain200H", "3", "32.90", "0.9500", "4.400", "4.600"]
    assert [t for t, _ in rows[ODD_SET]] == [ODD_SET, "2", "—", "—", "6.000", "4.250"]
    higher = [ReportColumn("score_rain", "S rainy", 1, "higher"), ReportColumn("score_out", "S derained", 1, "higher")]
    index = write_report(save, sets, higher, [{"dataset": "x", "images": 1, "score_rain": 2.0, "score_out": 3.0}],
                         progress=False)
    assert [t for t, strong in parse(index).rows[1] if strong] == ["3.0"]


def test_previews_downsized_and_reused(evaluation, tmp_path):
    save, sets, summary = evaluation
    big = _write(str(tmp_path / "big" / "wide.png"), size=(400, 1000))
    sets[1].items[1] = (big, None)
    index = write_report(save, sets, COLUMNS, summary, progress=False)
    folder = os.path.join(save, "report")
    previews = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg"))
    assert len(previews) == 12
    wide = [p for p in previews if os.path.basename(p) == "wide.jpg"]
    assert len(wide) == 1 and Image.open(wide[0]).size == (768, 307)  # 400 * 768 / 1000 = 307.2
    img = [a for t, a in parse(index).tags if t == "img" and a["src"].endswith("wide.jpg")]
    assert img and all((a["width"], a["height"]) == ("768", "307") for a in img)
    # a second run keeps every preview newer than its source; a source changed since is redone
    stamp = os.path.getmtime(big) + 100
    for p in previews:
        os.utime(p, (stamp, stamp))
    os.utime(big, (stamp + 50, stamp + 50))
    write_report(save, sets, COLUMNS, summary, progress=False)
    changed = [p for p in previews if os.path.getmtime(p) != stamp]
    assert changed == wide


def test_pages_and_missing_images(evaluation, caplog):
    save, sets, summary = evaluation
    os.remove(sets[0].outputs[2])
    with caplog.at_level(logging.WARNING, logger="coic.test"):
        index = write_report(save, sets, COLUMNS, summary, page_size=2, progress=False)
    assert "1 images could not be shown" in caplog.text
    pages = _pages(index)
    page2 = os.path.realpath(os.path.join(save, "report", "Rain200H", "page-002.html"))
    assert page2 in pages and "derained: missing" in "".join(pages[page2].text)
    ids = sorted(a["id"] for p in pages.values() for t, a in p.tags if t == "article")
    assert ids == sorted(["Rain200H.1", "Rain200H.2", "Rain200H.3", "Real_b_rain_b_more.1", "Real_b_rain_b_more.2"])
    write_report(save, sets, COLUMNS, summary, page_size=10, progress=False)
    assert not os.path.exists(page2)  # a page of the earlier, longer paging is removed


def test_mismatched_lengths_are_a_bug(evaluation):
    save, sets, summary = evaluation
    sets[0].rows.pop()
    with pytest.raises(ValueError, match="3 items, 3 outputs, 2 rows"):
        write_report(save, sets, COLUMNS, summary, progress=False)


def test_test_model_writes_the_page(tiny_demo, tmp_path):
    import csv

    import torch

    import test_model
    from models import build_model

    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny.pth")
    torch.save({"model_name": "BRN", "model_hparams": {"inter_iter": 1},
                "model": build_model("BRN", inter_iter=1, dim_in=0).state_dict()}, ckpt)
    out = str(tmp_path / "out")
    argv = ["--test_model", ckpt, "--test_dir", os.path.join(tiny_demo, "heavy", "test"), "--save_path", out]
    assert test_model.main(argv) == 0
    pages = _pages(os.path.join(out, "index.html"))
    index = pages[os.path.realpath(os.path.join(out, "index.html"))]
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    text = "".join(index.text)
    assert len(rows) == 4 and all(f"PSNR {float(r['psnr']):.2f}" in text for r in rows)
    assert "Metric protocol: coic" in text
    mean = sum(float(r["psnr"]) for r in rows) / len(rows)
    assert f"{mean:.2f}" in [t for t, _ in index.rows[1]]
    assert len(_targets(pages, "src")) == 12  # rainy, derained and clean previews of 4 pairs


def test_stacked_pair_shows_each_half(tmp_path):
    from utils.images import StackedHalf

    stacked = np.zeros((10, 24, 3), np.uint8)
    stacked[:, :12, 0] = 255  # left half red (rainy), right half blue (clean)
    stacked[:, 12:, 2] = 255
    path = str(tmp_path / "in" / "1.png")
    os.makedirs(os.path.dirname(path))
    Image.fromarray(stacked).save(path)
    out = _write(str(tmp_path / "res" / "1.png"), size=(10, 12))
    rs = ReportSet("DID", [(StackedHalf(path, "left"), StackedHalf(path, "right"))], [out], [{"name": "1.png"}])
    write_report(str(tmp_path / "res"), [rs], COLUMNS, [], progress=False)
    for kind, channel in (("rain", 0), ("clean", 2)):
        preview = np.asarray(Image.open(tmp_path / "res" / "report" / "DID" / kind / "1.jpg"))
        assert preview.shape == (10, 12, 3) and preview[..., channel].min() > 200  # that half only
