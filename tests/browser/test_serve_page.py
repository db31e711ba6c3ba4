"""`attnhooks serve` in a real headless Chromium over a 16k-token q/k/lse store: the page renders, logs
no error, asks nothing of any other host; zooming in with the mouse wheel fetches exact tiles (each
equal to Store.attention), and hovering a cell shows the store's weight."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from tests.unit.viewer.test_serve import qk_store

N = 16384
ML, MT = 110, 80  # the map's margins in serve.js


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("uvicorn", reason="attnhooks serve needs attnhooks[serve] (starlette, uvicorn)")
    st = qk_store(tmp_path_factory.mktemp("long") / "long.zarr", N, heads=1, dim=4, summary=True)
    cmd = [sys.executable, "-m", "attnhooks.cli", "serve", str(st.location), "--port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"attnhooks serve printed {url!r} first; stderr: {proc.stderr.read()}")
    yield st, url
    proc.terminate()
    proc.wait(timeout=30)


def test_zooming_in_fetches_exact_tiles_and_hover_shows_the_store_value(watched, served):
    st, url = served
    page = watched.page
    tiles = {}

    def keep(response):
        if "/api/attention" in response.url and response.ok:
            tiles[response.url] = response.body()

    page.on("response", keep)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    watched.screenshot_is_not_blank()
    assert not tiles  # the whole head is drawn from the summary's overview: no tile yet

    row, col = 9000, 8800
    box = page.locator("#ah-map").bounding_box()

    def point(view):  # the page coordinates of the middle of cell (row, col)
        return (
            box["x"] + ML + (col + 0.5 - view["x0"]) / view["cpp"],
            box["y"] + MT + (row + 0.5 - view["y0"]) / view["cpp"],
        )

    page.mouse.move(*point(page.evaluate("window.ahServe.S.view")))
    for _ in range(22):  # 1.25x per notch: from 25.6 cells per pixel to ~2 pixels per cell
        page.mouse.wheel(0, -100)
        page.wait_for_timeout(30)
    page.wait_for_function("+document.getElementById('ah-map').dataset.exactTiles > 0", timeout=60_000)
    page.wait_for_function(
        "[...window.ahServe.S.tiles.values()].every(t => t.values)", timeout=60_000
    )  # every visible tile arrived
    assert page.evaluate("window.ahServe.S.view.cpp") <= 1
    assert tiles, "zooming in fetched no tile"
    for address, body in tiles.items():
        q = parse_qs(urlparse(address).query)
        rows, cols = (tuple(int(v) for v in q[k][0].split(":")) for k in ("rows", "cols"))
        assert q["format"] == ["f32"] and rows[1] - rows[0] <= 256 and cols[1] - cols[0] <= 256
        values = np.frombuffer(body, dtype="<f4").reshape(rows[1] - rows[0], cols[1] - cols[0])
        np.testing.assert_array_equal(values, st.attention("attn", heads=0, rows=slice(*rows), cols=slice(*cols)))

    page.mouse.move(*point(page.evaluate("window.ahServe.S.view")))
    shown = page.evaluate("({...document.getElementById('ah-hover').dataset})")
    assert shown["source"] == "tile" and (int(shown["row"]), int(shown["col"])) == (row, col)
    assert float(shown["value"]) == float(st.attention("attn", heads=0, rows=row, cols=col))
    watched.screenshot_is_not_blank()
    assert all(r.startswith(url) for r in watched.requests), [r for r in watched.requests if not r.startswith(url)]
    assert not watched.errors


def test_clicking_a_row_lists_its_strongest_keys(watched, served):
    st, url = served
    page = watched.page
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    page.evaluate("window.ahServe.selectRow(12345)")
    page.wait_for_selector("#ah-row tr.ah-w", timeout=30_000)
    rows = page.eval_on_selector_all("#ah-row tr.ah-w", "rs => rs.map(r => [+r.dataset.col, r.dataset.value])")
    probs = st.attention("attn", heads=0, rows=12345)
    assert [c for c, _ in rows] == np.argsort(-probs, kind="stable")[:4].tolist()
    assert all(float(v) == float(probs[c]) for c, v in rows)
    assert not watched.errors
