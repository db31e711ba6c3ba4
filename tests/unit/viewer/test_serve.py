"""`attnhooks serve`: its JSON API over a real store (values equal to Store.attention, 4xx JSON errors,
a size limit), and the real server over HTTP: URL on the first line, 127.0.0.1, read-only, nothing
but / and /api, still serving after bad requests; a missing extra is one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.cli.main import main
from attnhooks.serve.api import Api

pytest.importorskip("starlette", reason="attnhooks serve needs attnhooks[serve] (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="attnhooks serve needs attnhooks[serve] (starlette, uvicorn)")


class Emitting(torch.nn.Module):
    def forward(self, q, k):
        attnhooks.emit(self, q=q, k=k, is_causal=True)
        return q


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Emitting()

    def forward(self, q, k):
        return self.attn(q, k)


def qk_store(path: Path, n: int, heads: int = 2, dim: int = 4, summary: bool = False) -> attnhooks.Store:
    """One causal call of ``n`` tokens (GQA: one KV head), q/k/lse (and a small summary) stored."""
    torch.manual_seed(0)
    model = Model()
    record = ("q", "k", "lse", "summary") if summary else ("q", "k", "lse")
    options = {"summary": {"topk": 1, "band": 1, "pooled": 128, "block": 2048}} if summary else {}
    with torch.inference_mode(), attnhooks.capture(model, store=path, record=record, **options):
        model(torch.randn(1, heads, n, dim), torch.randn(1, 1, n, dim))
    return attnhooks.open_store(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return qk_store(tmp_path_factory.mktemp("serve") / "qk.zarr", 300, summary=True)


def test_a_window_equals_store_attention_through_json(store):
    api = Api(store)
    status, body = api.handle("attention", {"module": "attn", "head": "1", "rows": "250:300", "cols": "3:120"})
    assert status == 200 and body["rows"] == [250, 300] and body["cols"] == [3, 120]
    values = np.array(json.loads(json.dumps(body))["values"], dtype=np.float64)
    expected = store.attention("attn", heads=1, rows=slice(250, 300), cols=slice(3, 120))
    assert values.shape == (50, 117) and values.any()
    np.testing.assert_array_equal(values, expected.astype(np.float64))  # float32 values survive JSON exactly


def test_overview_summary_and_row_come_from_the_store(store):
    api = Api(store)
    status, ov = api.handle("overview", {"module": "attn", "head": "0"})
    assert status == 200 and ov["source"] == "summary"
    np.testing.assert_array_equal(
        np.array(ov["values"], dtype=float), store.summary("attn")["pooled_max"][0].astype(float)
    )
    status, sm = api.handle("summary", {"module": "attn", "head": "1", "points": "1000"})
    np.testing.assert_allclose(sm["entropy"]["values"], store.summary("attn")["entropy"][1], rtol=1e-6)
    status, row = api.handle("row", {"module": "attn", "head": "0", "row": "299", "top": "3"})
    probs = store.attention("attn", heads=0, rows=299)
    assert row["heads"][0]["keys"] == np.argsort(-probs, kind="stable")[:3].tolist()
    assert row["heads"][0]["weights"] == probs[row["heads"][0]["keys"]].tolist()
    q, k = store.q("attn")[0, 299], store.k("attn")[0]
    np.testing.assert_allclose(row["qk"]["scores"], (k[row["qk"]["keys"]] @ q) * store.info("attn")["scale"], rtol=1e-5)


def test_an_overview_without_summary_is_pooled_while_read(tmp_path):
    st = qk_store(tmp_path / "plain.zarr", 64)
    status, ov = Api(st).handle("overview", {"module": "attn", "head": "1", "size": "16"})
    assert status == 200 and ov["source"] == "pooled while read" and ov["bins"] == [4, 4]
    full = st.attention("attn", heads=1)
    assert ov["values"][3][2] == pytest.approx(float(full[12:16, 8:12].max()))
    assert ov["values"][0][3] is None  # above the diagonal: no row may attend
    status, sm = Api(st).handle("summary", {"module": "attn"})
    assert status == 200 and sm["available"] is False and "record=" in sm["why"]


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"module": "nope"}, 404, "not in the store"),
        ({}, 400, "module= is missing"),
        ({"module": "attn", "head": "2"}, 400, "head=2 is out of range"),
        ({"module": "attn", "head": "x"}, 400, "not an integer"),
        ({"module": "attn", "rows": "290:310"}, 400, "out of range"),
        ({"module": "attn", "rows": "5-9"}, 400, "not a range"),
        ({"module": "attn", "cols": "9:3"}, 400, "out of range"),
        ({"module": "attn", "step": "4"}, 404, "not a committed step"),
        ({"module": "attn", "sample": "3"}, 404, "sample=3"),
        ({"module": "attn", "method": "stored", "rows": "0:9"}, 404, "no stored attention"),
        ({"module": "attn", "rows": "0:300", "cols": "0:300"}, 413, "more than the limit"),
    ],
)
def test_bad_requests_are_4xx_json(store, params, status, words):
    got, body = Api(store, max_cells=256 * 256).handle("attention", params)
    assert got == status and words in body["error"], body


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
            return r.status, json.loads(data) if r.headers.get_content_type() == "application/json" else data
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(store):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "attnhooks.cli", "serve", str(store.location), "--port", "0", "--max-cells", "70000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline().strip()
        if not first.startswith("http://"):
            proc.kill()
            pytest.fail(f"attnhooks serve printed {first!r} first; stderr: {proc.stderr.read()}")
        yield first
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_server_answers_on_127_0_0_1_and_keeps_serving_after_errors(server, store):
    assert server.startswith("http://127.0.0.1:") and server.endswith("/")
    status, page = _get(server)
    assert status == 200 and b"attnhooks-serve/1" in page and b"connect-src 'self'" in page
    for bad in (
        "api/attention?module=attn&rows=a",
        "api/attention?module=zz",
        "api/nothing",
        "../pyproject.toml",
        "api/attention?module=attn&rows=0:300&cols=0:300",
        "static/x.js",
    ):
        status, body = _get(server + bad)
        assert 400 <= status < 500 and body["error"], (bad, status, body)
    status, body = _get(server + "api/attention?module=attn&head=0&rows=10:20&cols=0:20")
    assert status == 200
    np.testing.assert_array_equal(
        np.array(body["values"]), store.attention("attn", heads=0, rows=slice(10, 20), cols=slice(0, 20))
    )
    with urllib.request.urlopen(server + "api/attention?module=attn&head=1&rows=0:256&cols=0:256&format=f32") as r:
        tile = np.frombuffer(r.read(), dtype="<f4").reshape(256, 256)
    np.testing.assert_array_equal(tile, store.attention("attn", heads=1, rows=slice(0, 256), cols=slice(0, 256)))
    request = urllib.request.Request(server + "api/attention?module=attn", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 405 and "error" in json.loads(err.value.read())


def test_a_missing_extra_is_one_line_naming_it(store, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails, as without the extra
    assert main(["serve", str(store.location)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'attnhooks[serve]'" in err and "uvicorn" in err


def test_the_fast_json_of_a_window_keeps_every_float32_exactly():
    """With orjson (``attnhooks[serve]``) a window is encoded from the array: each float32 value,
    widened to float64, reads back exactly, as with ``json`` (which the server falls back to)."""
    from attnhooks.serve.app import _numpy_json

    encode = _numpy_json()
    if encode is None:
        pytest.skip("orjson is not installed (the server then uses json)")
    rng = np.random.default_rng(0)
    window = np.concatenate([rng.random(4000), rng.random(4000) * 1e-30, [0.0, 1.0, 1e-45, 3.4e38]])
    window = window.astype(np.float32).reshape(-1, 4)
    body = json.loads(encode({"rows": [0, len(window)], "cols": [0, 4], "values": window.astype(np.float64)}))
    assert body["rows"] == [0, len(window)]
    np.testing.assert_array_equal(np.array(body["values"], dtype=np.float64), window.astype(np.float64))
    assert np.array_equal(np.array(body["values"], dtype=np.float32), window)
