"""Staging: the recycler of host buffers (a buffer is handed out again only once nothing else holds it or its
memory, and a capture's records are never overwritten while someone holds them) and the copies of new keys."""

from __future__ import annotations

import torch

import attnhooks
from attnhooks.capturing import staging
from attnhooks.capturing.staging import Recycler, Stager
from tests import models


def test_the_use_counts_read_as_the_recycler_expects_here():
    assert staging._COUNTS, "torch's storage use count changed: buffers are no longer reused (slower, still exact)"


def test_a_buffer_comes_back_only_when_nothing_holds_it_or_its_memory():
    r = Recycler()
    a = r.empty((4, 8), torch.float32)
    ptr = a.data_ptr()
    assert r.empty((4, 8), torch.float32).data_ptr() != ptr, "held by `a`: not handed out again"
    holders = [lambda t: t[1:], lambda t: t.numpy(), lambda t: t.detach(), lambda t: t.untyped_storage()]
    for hold in holders:
        held = hold(a)
        del a
        taken = [r.empty((4, 8), torch.float32) for _ in range(3)]  # every buffer of the shape, in turn
        assert ptr not in {t.data_ptr() for t in taken}, "its memory is still in use"
        del taken, held
        a = r.empty((4, 8), torch.float32)
        while a.data_ptr() != ptr:  # free now: it comes round again
            a = r.empty((4, 8), torch.float32)
    assert r.empty((4, 9), torch.float32).data_ptr() != ptr  # another shape, another buffer


def test_the_recycler_keeps_at_most_its_limit_and_drops_the_shapes_used_least_recently():
    r = Recycler(limit=8192)
    held = [r.empty((64,), torch.float32) for _ in range(3)]  # 3 x 256 bytes
    held += [r.empty((n, 64), torch.float32) for n in (2, 3, 4, 8, 8)]  # 512 + 768 + 1024 + 2 x 2048
    assert r.kept == 7168
    held.append(r.empty((1000,), torch.float32))  # over limit // 4: never kept
    assert ((1000,), torch.float32, None) not in r._buffers
    held.append(r.empty((6, 64), torch.float32))  # 1536 more: the oldest shape's buffers go until it fits
    assert r.kept == 8192 and len(r._buffers[((64,), torch.float32, None)]) == 1
    held.append(r.empty((7, 64), torch.float32))  # 1792 more
    assert r.kept <= 8192 and ((64,), torch.float32, None) not in r._buffers
    assert ((2, 64), torch.float32, None) not in r._buffers
    assert ((6, 64), torch.float32, None) in r._buffers and ((8, 64), torch.float32, None) in r._buffers
    r.clear()
    assert r.kept == 0 and not r._buffers


def _in_a_new_thread(fn):
    """Run ``fn`` on a thread of its own: a recycler of its own, empty at the start."""
    import threading

    errors = []

    def run():
        try:
            fn()
        except BaseException as err:  # reported on the test's thread
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_records_held_across_steps_are_not_overwritten_and_cleared_ones_are_reused():
    model = models.llama()
    x = models.ids(batch=4, length=64)[0]  # q, k, attn over 16 KiB: recycled (smaller ones are allocated)
    names = ("q", "k", "attn")

    def pointers(records):
        return {getattr(r, n).data_ptr() for r in records for n in names}

    def body():
        with torch.no_grad(), attnhooks.capture(model, record=names) as cap:
            model(x)
            first = cap.records[0]
            saved = {name: getattr(first, name).clone() for name in names}
            before = pointers(cap.records)
            cap.clear()
            model(x * 0 + 3)  # other tokens: other values
            assert all(torch.equal(getattr(first, n), t) for n, t in saved.items()), "a held record was overwritten"
            now = pointers(cap.records)
            assert not now & pointers([first]), "a held record's buffers are not handed out"
            assert now & before, "buffers of cleared records are reused"
        del first, cap
        with torch.no_grad(), attnhooks.capture(model, record=names) as cap:
            model(x)
        assert pointers(cap.records) & (now | before), "a new capture on the thread reuses the last one's buffers"
        assert 0 < staging.recycler().kept <= staging.recycler().limit

    _in_a_new_thread(body)


def test_stage_keys_copies_the_new_keys_whatever_their_size_and_layout():
    stager = Stager()
    cache = torch.randn(2, 4, 40, 16)
    strided = torch.randn(2, 64, 4, 16).transpose(1, 2)  # [batch, heads, keys, dim] as a projection leaves it
    for k, start in ((cache, 39), (cache, 3), (cache, 0), (strided, 1), (strided, 0), (torch.randn(1, 4, 600, 16), 5)):
        kept = stager.stage_keys(k, start)
        assert torch.equal(kept, k[:, :, start:]), (tuple(k.shape), start)
        before = kept.clone()
        k.add_(1.0)  # the model updates its cache in place: the staged keys keep what they were
        assert torch.equal(kept, before), (tuple(k.shape), start)
    grad = torch.randn(1, 2, 5, 8, requires_grad=True)
    assert not stager.stage_keys(grad, 4).requires_grad, "staged keys are outside autograd"


def test_a_dense_strided_tensor_is_staged_in_a_recycled_buffer_of_its_own_layout():
    """q after a projection's transpose(1, 2) and RoPE is dense but not contiguous: its copy keeps its
    layout (a straight copy, not a transposing one); a tensor that is not dense gets a contiguous buffer."""

    def check():
        q = torch.randn(4, 64, 4, 16).transpose(1, 2)  # [batch, heads, tokens, dim], 16 KiB
        staged = Stager().stage(q)
        assert torch.equal(staged, q) and staged.stride() == q.stride() and staged.data_ptr() != q.data_ptr()
        ptr = staged.data_ptr()
        del staged
        again = Stager().stage(q)  # the buffer came free: handed out again, same layout
        assert again.data_ptr() == ptr and again.stride() == q.stride() and torch.equal(again, q)
        sliced = torch.randn(4, 4, 80, 16)[:, :, 8:72]  # not dense: a contiguous copy
        copy = Stager().stage(sliced)
        assert torch.equal(copy, sliced) and copy.is_contiguous()

    _in_a_new_thread(check)
