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
CASES = [
    ("llama", name) for name in STRATEGIES
] + [
    ("mistral", "greedy"),
    ("mistral", "beam"),
    ("gemma2", "greedy"),
    ("gemma2", "static"),
    ("gemma2", "beam"),
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
    ``[h, r, K]`` (its K keys are positions ``[end - K, end)``, or a static buffer from 0)."""
    width = ref.shape[-1]
    if width >= end:  # every key from position 0 (a static buffer: unwritten slots must be 0)
        assert np.abs(ref[..., end:]).max(initial=0.0) == 0.0
        return float(np.abs(ours[..., :end] - ref[..., :end]).max())
    assert np.abs(ours[..., : end - width]).max(initial=0.0) == 0.0, "keys a rolling cache dropped get 0"
    return float(np.abs(ours[..., end - width : end] - ref).max())


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
    ref = _reference(eager, kw)
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

    store = tmp_path / "gen.zarr"
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
