"""Streaming captures of real model families into stores: what is read back is what was captured.

The reference is always the same capture kept in memory (``keep=True``), compared bit for bit, and
for generation the eager attention of the whole sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhooks
from tests import models

BACKENDS = ["zarr", "hdf5", "memory"]


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path):
    if request.param == "memory":
        loc = f"memory://{request.node.name}"
        yield loc
        from attnhooks.backends.memory import MemoryBackend

        MemoryBackend.delete(loc)
    else:
        yield str(tmp_path / ("run.zarr" if request.param == "zarr" else "run.h5"))


def _same(st: attnhooks.Store, rec: attnhooks.Record, assembled: bool = False) -> None:
    """Every recorded tensor of ``rec`` equals what the store returns, for every sample."""
    for b in range(rec.q.shape[0]):
        assert np.array_equal(st.q(rec.module, rec.step, b, rec.call), rec.q[b].numpy())
        assert np.array_equal(st.k(rec.module, rec.step, b, rec.call), rec.k[b].numpy())
        if rec.attn is not None:
            assert np.array_equal(st.attention(rec.module, rec.step, b, rec.call), rec.attn[b].numpy())
        if rec.lse is not None and not assembled:
            assert np.array_equal(st.lse(rec.module, rec.step, b, rec.call), rec.lse[b].numpy())


def test_t5_cross_attention_and_position_bias_round_trip(location):
    model = models.t5()
    x, mask = models.ids(batch=2, length=7, pad_last=2)
    dec = torch.randint(3, 100, (2, 5))
    with torch.no_grad(), attnhooks.capture(model, store=location, keep=True, record=("attn", "q", "k", "lse")) as cap:
        model(input_ids=x, attention_mask=mask, decoder_input_ids=dec)
    st = attnhooks.open_store(location)
    assert st.steps == [0] and set(st.modules) == {r.module for r in cap.records}
    kinds = {st.module_info(m)["kind"] for m in st.modules}
    assert kinds == {"self", "cross"}
    for rec in cap.records:
        _same(st, rec)
        stored = st.mask(rec.module, 0, 1, rec.call)
        if rec.mask.dense is not None:  # T5's relative position bias (+ padding) is kept dense
            dense = rec.mask.dense.float().expand(-1, -1, rec.q.shape[2], rec.k_len)
            assert np.array_equal(stored["dense"], dense[-1 if dense.shape[0] > 1 else 0].numpy())
        elif rec.mask.key_valid is not None:
            assert np.array_equal(stored["key_valid"], rec.mask.key_valid[1].numpy())


def test_t5_generation_is_one_step_with_growing_streams(location):
    model = models.t5()
    x, mask = models.ids(batch=1, length=6)
    with torch.no_grad(), attnhooks.capture(model, store=location, keep=True) as cap:
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False)
    st = attnhooks.open_store(location)
    assert st.steps == [0]
    assert st.tokens(0)[0] == out[0].tolist(), "generate() stores the sequences it returned"
    for module in st.modules:
        full = cap.assemble(module, 0)
        _same(st, full, assembled=True)
        assert st.info(module, 0)["q_len"] == full.q.shape[2]


def test_llama_generation_rows_equal_eager_attention(location):
    model, eager = models.same_weights(models.llama, "eager")
    x, mask = models.ids(batch=2, length=6, pad_last=2)
    with torch.no_grad(), attnhooks.capture(model, store=location):
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, out.shape[1] - 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = eager(input_ids=out, attention_mask=full_mask, output_attentions=True).attentions
    st = attnhooks.open_store(location)
    n = 6 + 7
    for layer in range(2):
        attn = st.attention(f"model.layers.{layer}.self_attn", 0, sample=0)
        assert attn.shape == (4, n, n)
        assert np.abs(attn - ref[layer][0, :, :n, :n].numpy()).max() <= 1e-5


def test_manual_decode_loop_commits_each_forward_of_the_step(tmp_path):
    """A hand-written KV-cache loop: each forward continues the step and commits it again."""
    model = models.llama()
    x, _ = models.ids(batch=1, length=5)
    path = tmp_path / "loop.zarr"
    with torch.no_grad(), attnhooks.capture(model, store=path, keep=True) as cap:
        out = model(input_ids=x, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(4):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            cap.flush()
            mid = attnhooks.open_store(path)  # a reader sees the step grow while it is written
            assert mid.steps == [0] and mid.info("model.layers.0.self_attn", 0)["q_len"] == 5 + i + 1
    st = attnhooks.open_store(path)
    for module in st.modules:
        _same(st, cap.assemble(module, 0), assembled=True)


def test_manual_steps_micro_batches_and_every(tmp_path):
    model = models.bert()
    x, mask = models.ids(batch=2, length=6)
    path = tmp_path / "train.h5"
    with torch.no_grad(), attnhooks.capture(model, store=path, every=2, keep=True) as cap:
        for step in range(5):
            cap.step = step
            model(input_ids=x, attention_mask=mask)
            model(input_ids=x[:1], attention_mask=mask[:1])  # a second micro-batch of the same step
    st = attnhooks.open_store(path)
    assert st.steps == [0, 2, 4]
    module = st.modules[0]
    assert [st.calls(module, s) for s in st.steps] == [2, 2, 2]
    assert st.info(module, 2, call=1)["batch"] == 1
    for rec in cap.records:
        _same(st, rec)


def test_dropout_is_recorded_with_the_call(tmp_path):
    model = models.bert("eager").train()
    x, mask = models.ids(batch=1, length=6)
    path = tmp_path / "drop.zarr"
    with pytest.warns(attnhooks.FaithfulnessWarning), attnhooks.capture(model, store=path) as cap:
        model(input_ids=x, attention_mask=mask)
    assert cap.records == [], "a store capture keeps nothing in memory unless keep=True"
    st = attnhooks.open_store(path)
    p = model.config.attention_probs_dropout_prob
    assert p > 0 and all(st.info(m, 0)["dropout"] == pytest.approx(p) for m in st.modules)


def test_training_is_unchanged_by_streaming_capture(tmp_path):
    def train(store):
        torch.manual_seed(0)
        model = models.llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, mask = models.ids(batch=2, length=8)
        losses = []
        ctx = attnhooks.capture(model, store=store, every=2) if store else None
        with ctx or torch.enable_grad():
            for _ in range(4):
                loss = model(input_ids=x, attention_mask=mask, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    plain, weights = train(None)
    captured, weights2 = train(tmp_path / "t.zarr")
    assert plain == captured
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2))
    assert attnhooks.open_store(tmp_path / "t.zarr").steps == [0, 2]


def test_a_forward_that_raises_commits_nothing_of_its_step(tmp_path):
    """Layer 0 runs, layer 1 raises: the half-run step is not committed, the earlier ones are."""
    model = models.llama()
    x, _ = models.ids(batch=1, length=6)
    boom = {"on": False}

    def explode(module, args):
        if boom["on"]:
            raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(explode)
    path = tmp_path / "fail.zarr"
    try:
        with torch.no_grad(), attnhooks.capture(model, store=path) as cap:
            model(input_ids=x)
            model(input_ids=x)
            boom["on"] = True
            with pytest.raises(RuntimeError, match="boom"):
                model(input_ids=x)
            boom["on"] = False
            model(input_ids=x[:, :4])
            cap.flush()
    finally:
        handle.remove()
    st = attnhooks.open_store(path)
    assert st.steps == [0, 1, 3] and st.dropped == 0
    assert st.info("model.layers.0.self_attn", 3)["q_len"] == 4


def test_an_unknown_compression_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(attnhooks.StoreOptionError, match="compression='brotli'"):
        attnhooks.capture(models.bert(), store=tmp_path / "x.zarr", compression="brotli")
    assert not (tmp_path / "x.zarr").exists()
