"""The spherical representation map: haversine coordinates to the sphere, and the tool's path
with a planted UMAP (umap-learn itself is an optional dependency)."""
import csv
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from analysis import representation_map
from analysis.representation_map import longitude_latitude, sphere_coordinates

pytest.importorskip("matplotlib")


def test_haversine_angles_to_the_sphere_and_back_to_longitude_latitude():
    angles = torch.tensor([[0.0, 1.3], [math.pi / 2, 0.0], [math.pi / 2, math.pi / 2], [math.pi, 0.0],
                           [math.pi / 3, -2.0]], dtype=torch.float64)
    points = sphere_coordinates(angles)
    expected = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0],
                             [math.sin(math.pi / 3) * math.cos(-2.0), math.sin(math.pi / 3) * math.sin(-2.0), 0.5]],
                            dtype=torch.float64)
    torch.testing.assert_close(points, expected, atol=1e-12, rtol=0)
    lonlat = longitude_latitude(points)
    torch.testing.assert_close(lonlat[1:3], torch.tensor([[0.0, 0.0], [90.0, 0.0]], dtype=torch.float64))
    assert lonlat[0, 1] == pytest.approx(90.0) and lonlat[3, 1] == pytest.approx(-90.0)
    assert lonlat[4].tolist() == pytest.approx([math.degrees(-2.0), 30.0])


class _PlantedUMAP:
    """Stands in for umap.UMAP: records its settings, returns fixed haversine coordinates."""
    seen = {}

    def __init__(self, **kwargs):
        _PlantedUMAP.seen = kwargs

    def fit_transform(self, data):
        n = data.shape[0]
        return np.stack([np.linspace(0.1, 3.0, n), np.linspace(-3.0, 3.0, n)], axis=1)


def test_sphere_projection_with_the_published_settings(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_PlantedUMAP))
    gen = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for k, label in enumerate(("a", "b")):
        for i in range(6):
            rows.append([label, f"{i}.png", *torch.randn(8, generator=gen).add(k).tolist()])
            labels.append(label)
    path = tmp_path / "embeddings.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "image", *[f"e{j}" for j in range(8)]])
        w.writerows(rows)
    out = tmp_path / "map"
    assert representation_map.main(["--embeddings", str(path), "--projection", "sphere", "--save_path", str(out)]) == 0
    assert _PlantedUMAP.seen["output_metric"] == "haversine" and _PlantedUMAP.seen["min_dist"] == 0.0
    assert _PlantedUMAP.seen["n_neighbors"] == 11  # the published 50, capped by 12 images
    with open(out / "projection_sphere.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["dataset"] for r in got] == labels
    xyz = torch.tensor([[float(r[c]) for c in "xyz"] for r in got], dtype=torch.float64)
    torch.testing.assert_close(xyz.norm(dim=1), torch.ones(12, dtype=torch.float64))
    assert float(got[0]["z"]) == pytest.approx(math.cos(0.1))
    assert os.path.getsize(out / "representation_sphere.png") > 0


def test_sphere_without_umap_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap raises ImportError
    path = tmp_path / "e.csv"
    path.write_text("dataset,image,e0,e1\n" + "".join(f"a,{i}.png,{i},1\n" for i in range(5)))
    assert representation_map.main(["--embeddings", str(path), "--projection", "sphere",
                                    "--save_path", str(tmp_path / "o")]) == 2
    assert "pip install umap-learn" in capsys.readouterr().err
