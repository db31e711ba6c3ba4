"""The recorder alone, fed synthetic attention events: call indices, KV-cache streams (new rows and
keys only), static buffers, crops, reorders, and the cache checks that refuse wrong placements."""

from __future__ import annotations

import pytest
import torch

import attnhooks
from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.build import RecordOptions
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.kvcache import Past
from attnhooks.capturing.recorder import Recorder

G = torch.Generator().manual_seed(0)
KEYS = torch.randn(2, 2, 32, 8, generator=G)  # every position's key, [batch, kv_heads, position, dim]


def _event(start: int, rows: int, keys: int | None = None, first_key: int = 0) -> AttentionEvent:
    """A causal self-attention call of ``rows`` query rows at positions ``start..``, over the keys
    ``first_key..start+rows`` (or a buffer of ``keys`` with the unwritten slots hidden)."""
    end = start + rows
    k = KEYS[:, :, first_key:end]
    if keys is not None:  # a static buffer: unwritten slots are zeros, hidden by the mask
        k = torch.cat([k, torch.zeros(2, 2, keys - end, 8)], dim=2)
    allowed = torch.arange(k.shape[2])[None, :] <= torch.arange(start, end)[:, None] - first_key
    mask = MaskSpec.from_kernel(allowed[None, None], False, rows, k.shape[2])
    return AttentionEvent(q=torch.randn(2, 4, rows, 8, generator=G), k=k, source="test", mask=mask)


def _recorder() -> Recorder:
    return Recorder(RecordOptions(frozenset({"q", "k", "lse"})))


def test_continuations_keep_only_their_new_rows_and_keys():
    rec = _recorder()
    rec.begin_pass(False, Past(0))
    first = rec.take("attn", _event(0, 5), cross=None)
    rec.begin_pass(True, Past(5))
    second = rec.take("attn", _event(5, 1), cross=None)
    rec.check()
    assert (first.q_offset, first.k.shape[2]) == (0, 5)
    assert (second.call, second.q_offset, second.k_offset, second.k.shape[2], second.k_len) == (0, 5, 5, 1, 6)
    assert torch.equal(second.k, KEYS[:, :, 5:6])


def test_a_static_buffer_is_cut_to_its_written_positions():
    rec = _recorder()
    rec.begin_pass(False, Past(0))
    prefill = rec.take("attn", _event(0, 4, keys=16), cross=None)
    rec.begin_pass(True, Past(4))
    decode = rec.take("attn", _event(4, 1, keys=16), cross=None)
    assert prefill.kind == "self" and prefill.k_len == 4 and prefill.k.shape[2] == 4
    assert decode.k_len == 5 and torch.equal(decode.k, KEYS[:, :, 4:5])


def test_a_crop_replaces_the_rejected_rows():
    rec = _recorder()
    rec.begin_pass(False, Past(0))
    rec.take("attn", _event(0, 4), cross=None)
    rec.begin_pass(True, Past(4))
    rec.take("attn", _event(4, 3), cross=None)  # three draft tokens
    rec.crop(5)  # two rejected
    assert [(r.q_offset, int(r.q.shape[2])) for r in rec.records] == [(0, 4), (4, 1)]
    rec.begin_pass(True, Past(5))
    again = rec.take("attn", _event(5, 1), cross=None)
    assert (again.q_offset, again.k_offset) == (5, 5)


def test_a_reorder_is_recorded_as_parents_and_checked_against_the_keys():
    rec = _recorder()
    rec.begin_pass(False, Past(0))
    rec.take("attn", _event(0, 3), cross=None)
    order = torch.tensor([1, 1])
    reordered = _event(3, 1)
    reordered.k = torch.cat([KEYS[order, :, :3], KEYS[:, :, 3:4]], dim=2)  # after reorder_cache([1, 1])
    rec.begin_pass(True, Past(3, parents=order))
    decode = rec.take("attn", reordered, cross=None)
    rec.check()
    assert decode.parents.tolist() == [[1], [1]]


def test_a_cache_that_contradicts_the_stream_is_refused():
    rec = _recorder()
    rec.begin_pass(False, Past(0))
    rec.take("attn", _event(0, 3), cross=None)
    rec.begin_pass(True, Past(7))  # holds positions the capture never saw
    with pytest.raises(attnhooks.CacheMismatchError, match="holds 7 positions"):
        rec.take("attn", _event(7, 1), cross=None)
    rec.begin_pass(True, Past(3))
    swapped = _event(3, 1)
    swapped.k = swapped.k.flip(0)  # the slots swapped behind the capture's back
    rec.take("attn", swapped, cross=None)
    with pytest.raises(attnhooks.CacheMismatchError, match="differ from the keys"):
        rec.check()
