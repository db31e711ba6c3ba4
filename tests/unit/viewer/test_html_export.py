"""The self-contained HTML export (attnhooks.viewer.html) and `attnhooks html`, without a browser:
the data a page carries equals the store's, the page refers to nothing outside itself."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import attnhooks
from attnhooks.cli.main import main
from attnhooks.errors import ViewError
from attnhooks.viewer.html import html_view, store_html
from attnhooks.viewer.html.data import pack, unpack


@pytest.fixture(scope="module")
def bert_store(tmp_path_factory):
    """A random 2-layer, 4-head BERT on 12 tokens, attn + q + k stored."""
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    path = tmp_path_factory.mktemp("html") / "bert.zarr"
    with torch.no_grad(), attnhooks.capture(model, store=path):
        model(input_ids=torch.randint(0, 100, (1, 12)))
    return attnhooks.open_store(path)


def payload(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="ah-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_packing_round_trips_exactly(dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((3, 5, 7)) * (255 if dtype == "uint8" else 1)).astype(dtype)
    spec = pack(a, dtype)
    assert spec["codec"] == "shuffle+deflate" and spec["shape"] == [3, 5, 7]
    np.testing.assert_array_equal(unpack(spec), a)


def test_a_store_export_carries_the_store_values_exactly(bert_store):
    st = bert_store
    view = store_html(st)
    data = payload(view.html)
    assert data["precision"] == "float32" and [layer["name"] for layer in data["layers"]] == st.modules
    for layer in data["layers"]:
        np.testing.assert_array_equal(unpack(layer["attn"]), st.attention(layer["name"]))
        np.testing.assert_array_equal(unpack(layer["q"]), st.q(layer["name"]))
        np.testing.assert_array_equal(unpack(layer["k"]), st.k(layer["name"]))
        assert unpack(layer["allowed"]).all()  # BERT without padding: every key visible
    ids, _ = st.tokens(0)
    assert data["tokens"] == [str(i) for i in ids]


def test_the_page_refers_to_nothing_outside_itself(bert_store):
    html = store_html(bert_store).html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|[\w./-]+\.(js|css))""", html, re.I)
    assert "http://" not in html and "https://" not in html and "import(" not in html
    assert "default-src 'none'" in html and "connect-src" not in html  # the page's policy forbids every request
    assert "</script>" not in payload(html).__repr__()


def test_float16_halves_the_data_and_says_so(bert_store):
    full, half = store_html(bert_store), store_html(bert_store, precision="float16")
    name = bert_store.modules[0]
    values = unpack(payload(half.html)["layers"][0]["attn"])
    assert payload(half.html)["precision"] == "float16"
    np.testing.assert_allclose(values, bert_store.attention(name), rtol=1e-3, atol=1e-4)
    assert half.nbytes < full.nbytes


def test_views_without_qk_carry_no_q_or_k(bert_store):
    data = payload(store_html(bert_store, views=("model", "head")).html)
    assert data["views"] == ["model", "head"] and all("q" not in layer for layer in data["layers"])


def test_arrays_and_bertviz_tuples_export(bert_store):
    attention, tokens = bert_store.to_bertviz(step=0)  # tuples of [1, heads, n, n] torch tensors
    data = payload(html_view(attention, tokens).html)
    assert len(data["layers"]) == 2
    np.testing.assert_array_equal(unpack(data["layers"][1]["attn"]), attention[1][0].numpy())


def test_notebook_display_is_the_page_in_an_iframe():
    view = html_view(np.full((1, 2, 3, 3), 1 / 3, dtype=np.float32), tokens=["a", "b", "c"])
    shown = view._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "&lt;script" in shown and "<script" not in shown


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": np.zeros((2, 3))}, "expected \\[layers, heads"),
        ({"attention": np.zeros((1, 2, 3, 3)), "tokens": ["a"]}, "1 tokens for 3 keys"),
        ({"attention": np.zeros((1, 2, 3, 3)), "q": np.zeros((1, 2, 3, 4))}, "give both q and k"),
        ({"attention": np.zeros((1, 2, 3, 3)), "views": ("lines",)}, "is not one of"),
        ({"attention": np.zeros((1, 2, 3, 3)), "precision": "int4"}, "precision='int4'"),
    ],
)
def test_bad_arrays_say_what_was_expected(kwargs, match):
    with pytest.raises(ViewError, match=match):
        html_view(**kwargs)


def test_too_long_a_call_points_to_serve(bert_store):
    with pytest.raises(ViewError, match="attnhooks serve"):
        store_html(bert_store, max_tokens=8)


def test_the_command_writes_one_file(bert_store, tmp_path, capsys):
    out = tmp_path / "bert.html"
    assert main(["html", str(bert_store.location), "-o", str(out), "--view", "model,head", "--module", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    data = payload(out.read_text())
    assert data["views"] == ["model", "head"] and [layer["name"] for layer in data["layers"]] == [bert_store.modules[1]]
    assert main(["html", str(bert_store.location), "-o", str(tmp_path / "x.png")]) == 1
    assert "must end in .html" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["html", str(bert_store.location), "-o", str(out), "--view", "lines"])
    assert exit_.value.code == 2
