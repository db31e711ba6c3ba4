"""The HTML export in a real headless Chromium, opened from disk: it renders, logs no error, makes no
request besides the file itself, and what it shows on hover equals the store's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import attnhooks
from attnhooks.viewer.html import store_html


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    folder = tmp_path_factory.mktemp("page")
    with torch.no_grad(), attnhooks.capture(model, store=folder / "bert.zarr"):
        model(input_ids=torch.randint(0, 100, (1, 12)))
    st = attnhooks.open_store(folder / "bert.zarr")
    return st, store_html(st).save(folder / "bert.html")


def open_page(watched, path):
    blocked = []

    def only_the_file(route):
        if route.request.url.startswith("file://") and route.request.url.endswith(path.name):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    watched.page.route("**/*", only_the_file)
    watched.page.goto(path.as_uri())
    watched.page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return blocked


def test_renders_from_disk_with_no_request_and_no_error(watched, exported):
    _, path = exported
    blocked = open_page(watched, path)
    watched.screenshot_is_not_blank()
    for view in ("model", "qk", "head"):
        watched.page.click(f"button[data-view='{view}']")
        assert watched.page.evaluate("document.body.dataset.view") == view
        watched.screenshot_is_not_blank()
    assert watched.requests == [path.as_uri()] and not blocked
    assert not watched.errors


def test_hovering_a_token_shows_its_exact_weights(watched, exported):
    st, path = exported
    open_page(watched, path)
    page = watched.page
    page.select_option("#ah-layer", "1")
    page.click("button:text-is('none')")
    page.click(".ah-heads label[data-head='2']")
    page.hover(".ah-tok.ah-left[data-index='5']")
    rows = page.eval_on_selector_all(
        "#ah-detail tr.ah-w", "rs => rs.map(r => [+r.dataset.head, +r.dataset.row, +r.dataset.col, r.dataset.value])"
    )
    expected = st.attention(st.modules[1], heads=2, rows=5)
    assert len(rows) == 6 and {r[0] for r in rows} == {2} and {r[1] for r in rows} == {5}
    for _, _, col, value in rows:
        assert float(value) == float(expected[col])  # the float32 the store holds, to the last bit
    assert [r[2] for r in rows] == np.argsort(-expected, kind="stable")[:6].tolist()
    assert not watched.errors


def test_a_model_view_cell_opens_its_head(watched, exported):
    _, path = exported
    open_page(watched, path)
    page = watched.page
    page.click("button[data-view='model']")
    assert page.locator("#ah-grid canvas").count() == 2 * 4
    page.click("#ah-grid canvas[data-layer='1'][data-head='3']")
    assert page.evaluate("document.body.dataset.view") == "head"
    assert page.input_value("#ah-layer") == "1"
    on = page.eval_on_selector_all(".ah-heads label:not(.ah-off)", "ls => ls.map(l => +l.dataset.head)")
    assert on == [3]
    assert not watched.errors


def test_the_query_key_view_recomputes_the_stored_row(watched, exported):
    st, path = exported
    open_page(watched, path)
    page = watched.page
    page.click("button[data-view='qk']")
    page.select_option("#ah-qk-head", "1")
    page.select_option("#ah-qk-query", "4")
    diff = float(page.get_attribute("#ah-qk-summary", "data-diff"))
    assert diff < 1e-5  # the softmax of the stored q and k, in the page, equals the stored row
    box = page.locator("#ah-qk").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 24 + 16 * 7 + 8)  # the row of key 7
    stored = page.locator("#ah-qk-detail tr.ah-w")
    assert stored.get_attribute("data-col") == "7"
    assert float(stored.get_attribute("data-value")) == float(st.attention(st.modules[0], heads=1, rows=4, cols=7))
    assert not watched.errors


def test_the_notebook_display_renders_inline(watched, exported):
    st, _ = exported
    page = watched.page
    page.set_content(f"<div class='output'>{store_html(st, views=('model', 'head'))._repr_html_()}</div>")
    frame = page.frame_locator("iframe")
    frame.locator("body[data-ready='1']").wait_for(timeout=30_000)
    assert frame.locator("#ah-grid canvas").count() == 2 * 4
    watched.screenshot_is_not_blank()
    assert not [r for r in watched.requests if not r.startswith(("about:", "data:"))]
    assert not watched.errors


def test_the_query_key_view_follows_gqa_and_padding(watched, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # sample 1 is left-padded by 3
    with torch.no_grad(), attnhooks.capture(model, store=tmp_path / "llama.zarr"):
        model(input_ids=ids, attention_mask=mask)
    st = attnhooks.open_store(tmp_path / "llama.zarr")
    path = store_html(st, sample=1, views=("qk",)).save(tmp_path / "llama.html")
    open_page(watched, path)
    page = watched.page
    for head in ("1", "3"):  # query heads of both KV heads
        page.select_option("#ah-qk-head", head)
        page.select_option("#ah-qk-query", "6")
        assert float(page.get_attribute("#ah-qk-summary", "data-diff")) < 1e-5
    assert not watched.errors
