"""``record="summary"``: reductions computed where the model runs equal those of the model's full
eager attention, in memory and through a store, for padded batches, GQA, sliding windows and
KV-cache generation (row reductions appended per decode call, column sums accumulated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.backends.memory import MemoryBackend
from attnhooks.reduce.summary import SummaryOptions
from tests import models
from tests.unit.reduce.test_reduce import reference_summary

TOL = 1e-5
OPT = SummaryOptions(topk=5, sinks=2, band=4, pooled=4, block=5)


@pytest.fixture
def location(request):
    loc = f"memory://{request.node.name}"
    yield loc
    MemoryBackend.delete(loc)


def _compare(got: dict, p: torch.Tensor, pooled_p: torch.Tensor | None = None) -> None:
    """``got`` (one sample's summary, numpy) against the reductions of ``p [heads, q, k]``."""
    want = reference_summary(p[None], 0, OPT)
    for name in ("entropy", "sink", "band", "received"):
        assert np.abs(got[name] - want[name][0].numpy()).max() <= TOL, name
    best = p.topk(OPT.topk, dim=-1).values.numpy()
    assert np.abs(got["topk_weight"] - best).max() <= TOL
    picked = np.take_along_axis(p.numpy(), got["topk_index"].astype(np.int64), axis=-1)
    assert np.abs(picked - got["topk_weight"]).max() <= TOL
    pooled = reference_summary((p if pooled_p is None else pooled_p)[None], 0, OPT)
    for name in ("pooled_max", "pooled_mean"):
        assert got[name].shape == pooled[name][0].shape, name
        assert np.abs(got[name] - pooled[name][0].numpy()).max() <= TOL, name


@pytest.mark.parametrize("make", [models.llama, models.mistral], ids=["llama-gqa", "mistral-window"])
def test_prefill_summary_equals_the_eager_attention(make, location):
    sdpa, eager = models.same_weights(make, "eager")
    x, mask = models.ids(batch=2, length=14, pad_last=3)
    with torch.no_grad(), attnhooks.capture(sdpa, store=location, record=("summary",), summary=OPT, keep=True) as cap:
        sdpa(input_ids=x, attention_mask=mask)
    with torch.no_grad():
        ref = eager(input_ids=x, attention_mask=mask, output_attentions=True).attentions
    st = attnhooks.open_store(location)
    assert all(r.summary is not None and r.attn is None and r.q is None for r in cap.records)
    for layer, module in enumerate(st.modules):
        got = st.summary(module, 0, sample=0)
        _compare(got, ref[layer][0])
        # padded query rows see no key: eager makes them uniform, the kernel (and attnhooks) empty
        p = ref[layer][1].clone()
        p[:, ~mask[1].bool()] = 0.0
        _compare(st.summary(module, 0, sample=1), p)


@pytest.mark.parametrize("make", [models.llama, models.mistral], ids=["llama-gqa", "mistral-rolling-cache"])
def test_generation_appends_rows_and_accumulates_column_sums(make, location):
    sdpa, eager = models.same_weights(make, "eager")
    x, _ = models.ids(batch=1, length=9)
    with torch.no_grad(), attnhooks.capture(sdpa, store=location, record=("summary", "q", "k"), summary=OPT) as cap:
        out = sdpa.generate(input_ids=x, max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = eager(input_ids=out, output_attentions=True).attentions
    n = out.shape[1] - 1
    st = attnhooks.open_store(location)
    for layer, module in enumerate(st.modules):
        got = st.summary(module, 0)
        assert got["entropy"].shape == (4, n) and got["received"].shape == (4, n)
        p = ref[layer][0, :, :n, :n]
        _compare(got, p, pooled_p=p[:, :9, :9])  # the overview map is the prefill's
    assert cap.records == []


def test_summary_options_are_checked_and_recorded(location):
    model = models.llama()
    with pytest.raises(attnhooks.RecordOptionError, match="topk"):
        attnhooks.capture(model, record=("summary",), summary={"topk": -1})
    with pytest.raises(attnhooks.RecordOptionError, match="fields"):
        attnhooks.capture(model, record=("summary",), summary={"top": 3})
    x, _ = models.ids(batch=1, length=5)
    with torch.no_grad(), attnhooks.capture(model, store=location, record="summary", summary={"pooled": 2}):
        model(input_ids=x)
    st = attnhooks.open_store(location)
    assert '"pooled": 2' in st.metadata["options"]
    assert st.summary(st.modules[0])["pooled_max"].shape == (4, 2, 2)
    with pytest.raises(attnhooks.NotInStoreError, match="attn"):
        st.attention(st.modules[0])


def test_progress_bar_counts_the_captured_calls(location, capsys):
    model = models.llama()
    x, _ = models.ids(batch=1, length=6)
    with torch.no_grad(), attnhooks.capture(model, store=location, record="summary", progress=True) as cap:
        model(input_ids=x)
        cap.step += 1
        model(input_ids=x)
    err = capsys.readouterr().err
    assert "attnhooks: 4 call" in err and "model.layers.1.self_attn" in err and "MiB written" in err


def test_chunked_prefill_adds_rows_and_column_sums_without_recomputing(location):
    """A prompt fed in three chunks through the KV cache: one stream whose reductions equal the full
    matrix's (the overview map is the first chunk's)."""
    sdpa, eager = models.same_weights(models.llama, "eager")
    x, _ = models.ids(batch=1, length=21)
    with torch.no_grad(), attnhooks.capture(sdpa, store=location, record=("summary", "q", "k"), summary=OPT):
        cache = None
        for chunk in (x[:, :8], x[:, 8:15], x[:, 15:]):
            cache = sdpa(input_ids=chunk, past_key_values=cache, use_cache=True).past_key_values
    with torch.no_grad():
        ref = eager(input_ids=x, output_attentions=True).attentions
    st = attnhooks.open_store(location)
    for layer, module in enumerate(st.modules):
        assert st.info(module, 0)["q_len"] == 21
        p = ref[layer][0]
        _compare(st.summary(module, 0), p, pooled_p=p[:, :8, :8])
        assert np.abs(st.attention(module, 0) - p.numpy()).max() <= TOL
