"""Every decoding strategy of Hugging Face generation, captured exactly: each generation step's
rows equal Hugging Face's own eager per-step ``output_attentions`` rows, in memory and rebuilt from
a store that holds only q, k and lse; one ``generate()`` is one step; stored keys grow O(N·d).

The reference is ``generate(..., output_attentions=True, return_dict_in_generate=True)`` of an
eager copy with the same weights: per step, every batch slot's rows over the keys its cache
handed the kernel (a static cache: the whole buffer, unwritten slots at 0; a rolling cache: its
last keys, in order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhooks
from tests import models

PROMPT = 6
NEW = 6


def _inputs(batch: int = 2, pad: int = 2):
    x, mask = models.ids(batch=batch, length=PROMPT, pad_last=pad)
    x[:, PROMPT // 2 :] = x[:, : PROMPT - PROMPT // 2]  # repeats: prompt lookup finds candidates
    return x, mask


STRATEGIES = {
    "greedy": {},
    "sample": {"do_sample": True, "top_k": 8},
    "static": {"cache_implementation": "static"},
    "beam": {"num_beams": 3},
    "prompt_lookup": {"prompt_lookup_num_tokens": 3},
    "assisted": {"assistant_model": "draft"},
}
CASES = [("llama", name) for name in STRATEGIES] + [
    ("mistral", "greedy"),
    ("mistral", "static"),
    ("mistral", "beam"),
    ("mistral", "prompt_lookup"),
    ("gemma2", "greedy"),
    ("gemma2", "static"),
    ("gemma2", "beam"),
    ("gemma2", "assisted"),
]


def _make(family: str):
    make = {"llama": models.llama, "mistral": models.mistral, "gemma2": models.gemma2}[family]
    torch.manual_seed(0)
    return models.same_weights(make, "eager")


def _generate_kw(family: str, strategy: str, batch: int):
    x, mask = _inputs(batch=batch, pad=2 if batch > 1 else 0)
    kw = {"input_ids": x, "attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    kw.update(STRATEGIES[strategy])
    if kw.get("assistant_model") == "draft":
        torch.manual_seed(5)
        kw["assistant_model"] = models.llama(layers=1)
    return kw


def _run(model, kw, **capture_kw):
    torch.manual_seed(1)
    with torch.no_grad(), attnhooks.capture(model, **capture_kw) as cap:
        out = model.generate(**kw)
    return cap, out


def _reference(eager, kw):
    torch.manual_seed(1)
    with torch.no_grad():
        return eager.generate(**kw, output_attentions=True, return_dict_in_generate=True)


def _compare(ours: np.ndarray, ref: np.ndarray, end: int) -> float:
    """Max error of our rows ``[h, r, keys in stream positions]`` against the reference's
    ``[h, r, K]``: its K keys are positions ``[0, K)`` when ``K >= end`` (a static buffer, or a row of
    a multi-token forward: keys from ``end`` on are hidden, 0), else a rolling cache's last keys,
    ``[end + z - K, end + z)`` where the ``z`` keys after the row (same forward) are hidden."""
    width = ref.shape[-1]
    if width >= end:
        assert np.abs(ref[..., end:]).max(initial=0.0) == 0.0
        return float(np.abs(ours[..., :end] - ref[..., :end]).max())
    nonzero = np.flatnonzero(np.abs(ref).reshape(-1, width).max(axis=0) > 0)
    z = width - 1 - int(nonzero[-1])
    assert np.abs(ours[..., : end + z - width]).max(initial=0.0) == 0.0, "keys a rolling cache dropped get 0"
    return float(np.abs(ours[..., end + z - width : end] - ref[..., : width - z]).max())


def _check_rows(rows_of, ref_steps, slots: int, pad_slots: set[int]) -> float:
    """Compare every slot's rows at every generation step; ``rows_of(b)`` is ``[h, rows, keys]``."""
    worst = 0.0
    for b in range(slots):
        ours = rows_of(b)
        first = 2 if b in pad_slots else 0  # padded prompt rows attend nothing real
        prefill = ref_steps[0][b].numpy()
        worst = max(worst, _compare(ours[:, first:PROMPT], prefill[:, first:], PROMPT))
        for t, step in enumerate(ref_steps[1:], start=1):
            row = PROMPT + t - 1
            worst = max(worst, _compare(ours[:, row : row + 1], step[b].numpy(), row + 1))
    return worst


@pytest.mark.parametrize(("family", "strategy"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_generation_rows_equal_eager_per_step_attentions(family, strategy, tmp_path):
    batch = 1 if strategy in ("prompt_lookup", "assisted") else 2  # HF: assisted decoding takes one sequence
    model, eager = _make(family)
    kw = _generate_kw(family, strategy, batch)
    try:
        ref = _reference(eager, kw)
    except ValueError as err:  # transformers 5.0-5.x: no assisted decoding over a rolled sliding window
        if "crop" not in str(err):
            raise
        pytest.skip(f"this transformers cannot run {strategy} decoding on {family} itself: {err}")
    beams = kw.get("num_beams", 1)
    slots = batch * beams
    pad_slots = set(range(beams, 2 * beams)) if batch > 1 else set()
    layers = [f"model.layers.{i}.self_attn" for i in range(2)]

    cap, out = _run(model, kw, modules="model.layers.*.self_attn")
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(sequences, ref.sequences), "capturing changed the generation"
    assert {r.step for r in cap.records} == {0}, "a generate() call is one step"
    for i, name in enumerate(layers):
        rec = cap.assemble(name)
        steps = [s[i] for s in ref.attentions]
        assert rec.attn.shape[2] == PROMPT + len(steps) - 1
        assert _check_rows(lambda b, rec=rec: rec.attn[b].numpy(), steps, slots, pad_slots) <= 1e-5
        if strategy not in ("prompt_lookup", "assisted"):
            decode = [r for r in cap.records if r.module == name][1:]
            assert all(r.q.shape[2] == 1 and r.k.shape[2] == 1 for r in decode), "one new query and key per call"

    store = tmp_path / ("gen.h5" if strategy in ("beam", "static") else "gen.zarr")  # both backends
    _run(model, kw, modules="model.layers.*.self_attn", record=("q", "k", "lse"), store=store)
    st = attnhooks.open_store(store)
    assert st.steps == [0]
    for i, name in enumerate(layers):
        steps = [s[i] for s in ref.attentions]
        worst = _check_rows(
            lambda b, name=name: st.attention(name, step=0, sample=b, method="reconstructed"), steps, slots, pad_slots
        )
        assert worst <= 1e-5
        reader = st.call_reader(name)
        rows = PROMPT + len(steps) - 1
        assert reader.q_len == rows and reader.k_len == rows
        drafts = 8 if strategy in ("prompt_lookup", "assisted") else 0  # rejected drafts' keys may stay written
        assert rows <= reader.k_stored <= rows + drafts, "keys are stored once: O(N·d)"


ENCODER_DECODER = {  # family: (decoder self-attention, cross-attention, encoder length)
    "t5": ("decoder.block.1.layer.0.SelfAttention", "decoder.block.1.layer.1.EncDecAttention", 7),
    "bart": ("model.decoder.layers.1.self_attn", "model.decoder.layers.1.encoder_attn", 7),
    "whisper": ("model.decoder.layers.1.self_attn", "model.decoder.layers.1.encoder_attn", 16),
}
ENC_DEC_CASES = [("t5", "greedy"), ("t5", "beam"), ("bart", "greedy"), ("bart", "beam"), ("whisper", "greedy")]


@pytest.mark.parametrize(("family", "strategy"), ENC_DEC_CASES, ids=[f"{f}-{s}" for f, s in ENC_DEC_CASES])
def test_encoder_decoder_generation_stores_encoder_keys_once_and_cross_rows_per_step(family, strategy, tmp_path):
    model, eager = models.same_weights(getattr(models, family), "eager")
    if family == "whisper":
        torch.manual_seed(0)
        kw = {"input_features": torch.randn(1, 8, 32)}
    else:
        x, mask = models.ids(batch=2, length=7, pad_last=2)
        kw = {"input_ids": x, "attention_mask": mask}
    kw.update(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    kw.update({"num_beams": 2} if strategy == "beam" else {})
    ref = _reference(eager, kw)
    del eager  # (transformers leaves its output-recording hooks on a model it returned attentions of)
    self_name, cross_name, enc = ENCODER_DECODER[family]
    slots = ref.decoder_attentions[0][1].shape[0]
    refs = {"self": [s[1] for s in ref.decoder_attentions], "cross": [s[1] for s in ref.cross_attentions]}
    cap, out = _run(model, kw)
    assert torch.equal(out, ref.sequences[:, -out.shape[1] :])  # (Whisper leaves its start token out)
    _run(model, kw, record=("q", "k", "lse"), store=tmp_path / "encdec.zarr")
    st = attnhooks.open_store(tmp_path / "encdec.zarr")
    for kind, name in (("self", self_name), ("cross", cross_name)):
        rec = cap.assemble(name)
        first = int(rec.attn.shape[2]) - len(refs[kind])  # the decoder's start tokens before the first step
        assert rec.kind == kind and first >= 0
        for b in range(slots):
            stored = st.attention(name, step=0, sample=b, method="reconstructed")
            for t, step in enumerate(refs[kind]):
                expected, row = step[b].numpy(), first + t
                end = enc if kind == "cross" else row + 1
                if t == 0 and expected.shape[1] > 1:  # the first step's rows: all start tokens at once
                    row, end = 0, expected.shape[1]
                rows = slice(row, row + expected.shape[1])
                assert _compare(rec.attn[b, :, rows].numpy(), expected, end) <= 1e-5
                assert _compare(stored[:, rows], expected, end) <= 1e-5
    cross = [r for r in cap.records if r.module == cross_name]
    assert cross[0].k.shape[2] == enc and all(r.k.shape[2] == 0 for r in cross[1:]), "encoder keys stored once"
    assert st.call_reader(cross_name).k_stored == enc


class TinyDecoder(torch.nn.Module):
    """A torch.nn decoder with its own KV cache (no transformers), in the style of gpt-fast."""

    def __init__(self, vocab: int = 32, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(64, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        past = 0 if self.cache is None or not use_cache else self.cache[0].shape[2]
        h = self.embed(ids) + self.pos(torch.arange(past, past + ids.shape[1]))
        b, n, d = h.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        if use_cache and self.cache is not None:
            k, v = torch.cat([self.cache[0], k], 2), torch.cat([self.cache[1], v], 2)
        self.cache = (k, v) if use_cache else None
        mask = torch.ones(n, k.shape[2], dtype=torch.bool).tril(k.shape[2] - n)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def test_custom_model_with_its_own_cache_continues_through_the_explicit_api(tmp_path):
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    ids = torch.randint(0, 32, (1, 5))
    with (
        torch.no_grad(),
        attnhooks.capture(model, record=("q", "k", "lse"), store=tmp_path / "tiny.h5", keep=True) as cap,
    ):
        logits = model(ids, use_cache=True)
        for _ in range(6):
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], 1)
            with cap.continuing():
                logits = model(nxt, use_cache=True)
    assert {r.step for r in cap.records} == {0}
    assert [(r.q_offset, r.k.shape[2]) for r in cap.records] == [(0, 5)] + [(5 + i, 1) for i in range(6)]
    with torch.no_grad(), attnhooks.capture(model) as full:  # the whole sequence at once, no cache
        model(ids)
    expected = full.records[0].attn[0].numpy()
    st = attnhooks.open_store(tmp_path / "tiny.h5")
    assert np.abs(st.attention("", step=0, method="reconstructed") - expected).max() <= 1e-5
    assert st.call_reader("").k_stored == 11


def _key_tensors(cache):
    layers = getattr(cache, "layers", None)
    return [layer.keys for layer in layers] if layers else list(cache.key_cache)


def test_a_cache_changed_behind_the_capture_raises_and_commits_nothing(tmp_path):
    from transformers import DynamicCache

    model = models.llama()
    x, _ = models.ids(batch=2, length=5)
    with pytest.raises(attnhooks.CacheMismatchError, match="differ from the keys"):
        with torch.no_grad(), attnhooks.capture(model, record=("q", "k"), store=tmp_path / "s.zarr"):
            cache = DynamicCache()
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            for keys in _key_tensors(cache):
                keys.copy_(keys.flip(0))  # the batch slots swapped by hand: nothing tells the capture
            model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    st = attnhooks.open_store(tmp_path / "s.zarr")
    assert st.steps == [0] and st.info("model.layers.0.self_attn")["q_len"] == 5, (
        "the prefill is kept; the rows of the forward whose cache contradicted them are not committed"
    )


def test_a_cache_reordered_or_cropped_through_its_own_methods_is_recorded_exactly(tmp_path):
    from transformers import DynamicCache

    model, eager = models.same_weights(models.llama, "eager")
    x, _ = models.ids(batch=2, length=5)
    with torch.no_grad(), attnhooks.capture(model, record=("q", "k", "lse"), store=tmp_path / "s.zarr", keep=True):
        cache = DynamicCache()
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        seq = x
        for step in range(4):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            if step == 1:
                cache.reorder_cache(torch.tensor([1, 1]))  # both slots continue slot 1
                seq = seq[[1, 1]]
        cache.crop(-2)  # the last two tokens rejected
        out = model(input_ids=seq[:, -2:-1], past_key_values=cache, use_cache=True)
    seq = seq[:, :-1]
    st = attnhooks.open_store(tmp_path / "s.zarr")
    for b in range(2):
        with torch.no_grad():
            ref = eager(input_ids=seq[b : b + 1], output_attentions=True).attentions[1][0].numpy()
        got = st.attention("model.layers.1.self_attn", step=0, sample=b, method="reconstructed")
        assert got.shape == ref.shape
        # rows from the reorder on belong to slot 1's history: compare them with the final sequence
        assert np.abs(got[:, 7:] - ref[:, 7:]).max() <= 1e-5


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_chunked_prefill_then_decode_is_one_stream_equal_to_eager(cache_kind, tmp_path):
    """The prompt fed in chunks through one cache, then decoded: every forward continues the first."""
    from transformers import DynamicCache, StaticCache

    model, eager = models.same_weights(models.llama, "eager")
    x, _ = models.ids(batch=2, length=12)
    if cache_kind == "static":
        try:
            cache = StaticCache(config=model.config, max_cache_len=32)
        except TypeError:  # transformers 4.x also wants the batch size
            cache = StaticCache(config=model.config, max_batch_size=2, max_cache_len=32)
    else:
        cache = DynamicCache()
    with torch.no_grad(), attnhooks.capture(model, store=tmp_path / "c.h5", record=("q", "k", "lse"), keep=True) as cap:
        seq = x
        for start in range(0, 12, 4):
            pos = torch.arange(start, start + 4)
            out = model(input_ids=x[:, start : start + 4], past_key_values=cache, use_cache=True, cache_position=pos)
        for t in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            pos = torch.tensor([12 + t])
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=pos)
    layer = [r for r in cap.records if r.module == "model.layers.1.self_attn"]
    assert [(r.step, r.q_offset, r.k.shape[2]) for r in layer] == [(0, 0, 4), (0, 4, 4), (0, 8, 4)] + [
        (0, 12 + t, 1) for t in range(3)
    ]
    with torch.no_grad():
        ref = eager(input_ids=seq, output_attentions=True).attentions[1].numpy()
    st = attnhooks.open_store(tmp_path / "c.h5")
    for b in range(2):
        got = st.attention("model.layers.1.self_attn", step=0, sample=b, method="reconstructed")
        assert got.shape == ref[b].shape and np.abs(got - ref[b]).max() <= 1e-5
    assert st.call_reader("model.layers.1.self_attn").k_stored == 15


def test_a_failed_beam_search_leaves_no_lineage_behind_for_the_step_that_reuses_its_place(tmp_path):
    """A generation that raises is not committed; the next step is written at its place and must not
    be read through the slot lineage the failed beam search wrote there."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] >= PROMPT + 4:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model, eager = _make("llama")
    x, mask = _inputs(batch=2, pad=0)
    kw = {"input_ids": x, "attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    store = tmp_path / "s.zarr"  # a small buffer: held decode rows are written before the failure
    with torch.no_grad(), attnhooks.capture(model, record=("q", "k", "lse"), store=store, buffer="16KiB"):
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(**kw, num_beams=3, stopping_criteria=StoppingCriteriaList([Boom()]))
        model.generate(**kw)
    ref = _reference(eager, kw)
    st = attnhooks.open_store(tmp_path / "s.zarr")
    assert len(st.steps) == 1
    steps = [s[1] for s in ref.attentions]
    worst = _check_rows(
        lambda b: st.attention("model.layers.1.self_attn", step=st.steps[0], sample=b, method="reconstructed"),
        steps,
        2,
        set(),
    )
    assert worst <= 1e-5
