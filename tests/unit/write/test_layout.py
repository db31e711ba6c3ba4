"""The pieces of the store writer on their own (:mod:`attnhooks.write`): chunk shapes, the array
layout over the in-memory backend, the staging budget, and the per-call tables a step commits
(a KV-cache stream whose cache was cropped included)."""

from __future__ import annotations

import doctest
import errno
import math
import threading
import uuid
from typing import ClassVar

import numpy as np
import pytest
import torch

from attnhooks.attention.masks import MaskSpec
from attnhooks.backends.base import Codec
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.stacks import stacked_view
from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import merge_contiguous
from attnhooks.errors import StoreFullError, StoreOptionError, StoreWriteError
from attnhooks.schema import INFO, module_path
from attnhooks.write import budget as budget_module
from attnhooks.write import layout as layout_module
from attnhooks.write import options as options_module
from attnhooks.write.attrs import Start, root_attrs
from attnhooks.write.budget import Budget, surface
from attnhooks.write.commit import Commits, OpenStep, new_call
from attnhooks.write.layout import ArrayLayout, chunk_shape
from attnhooks.write.options import StoreOptions
from attnhooks.write.writer import StoreWriter

MODULE = "layers.0.attn"
HEADS, DIM = 2, 4


@pytest.fixture
def backend():
    location = f"memory://test-write-{uuid.uuid4().hex}"
    be = MemoryBackend.open(location, "w-", root_attrs(MemoryBackend, StoreOptions(), {}))
    yield be
    MemoryBackend.delete(location)


def _info(backend, pos: int, call: int = 0) -> dict[str, int]:
    row = stacked_view(backend).read(module_path(MODULE, "info"), (pos, call))
    return dict(zip(INFO, (int(x) for x in row)))


def _record(rows: int, q_offset: int = 0, k_len: int | None = None, batch: int = 1) -> Record:
    """A causal call of ``rows`` query rows at ``q_offset``, adding its own keys (a prefill or a
    KV-cache continuation)."""
    k_len = q_offset + rows if k_len is None else k_len
    g = torch.Generator().manual_seed(q_offset)
    attn = torch.rand(batch, HEADS, rows, k_len, generator=g)
    return Record(
        MODULE,
        call=0,
        step=0,
        q=torch.randn(batch, HEADS, rows, DIM, generator=g),
        k=torch.randn(batch, HEADS, k_len - q_offset, DIM, generator=g),
        attn=attn / attn.sum(-1, keepdim=True),
        scale=DIM**-0.5,
        mask=MaskSpec(causal=True, offset=q_offset),
        q_offset=q_offset,
        k_offset=q_offset,
        k_len=k_len,
    )


# -- chunk shapes -----------------------------------------------------------------------------------
SHAPES = [
    ("attn", (1, 1, 1, 12, 7, 7), 4),
    ("attn", (1, 1, 8, 32, 2048, 2048), 4),
    ("attn", (1, 1, 3, 16, 5000, 5000), 2),
    ("attn", (1, 1, 4, 8, 100, 100), 4),
    ("q", (1, 1, 2, 16, 4096, 128), 2),
    ("q", (1, 1, 64, 4, 9, 64), 4),
    ("k", (1, 1, 1, 8, 100_000, 128), 4),
    ("lse", (1, 1, 2, 32, 30_000), 4),
    ("summary/entropy", (1, 1, 2, 12, 77), 4),
    ("mask/dense", (1, 1, 1, 1, 512, 512), 4),
    ("mask/key_valid", (1, 1, 16, 3000), 1),
]


@pytest.mark.parametrize(("leaf", "shape", "itemsize"), SHAPES)
def test_chunks_stay_under_the_byte_bounds_and_cover_the_shape(leaf, shape, itemsize):
    chunks = chunk_shape(shape, itemsize, leaf)
    assert len(chunks) == len(shape) and chunks[:2] == (1, 1), "one step, one call per chunk"
    nbytes = math.prod(chunks) * itemsize
    assert nbytes <= layout_module._CHUNK_BYTES, (chunks, nbytes)
    seq = 3 if leaf == "mask/key_valid" else 4
    for axis in range(seq, len(shape)):
        assert chunks[axis] & (chunks[axis] - 1) == 0 and chunks[axis] >= 16, "powers of two, at least 16"
    last = shape[-1]
    if math.prod(shape[3:]) * itemsize <= layout_module._CHUNK_BYTES // 4:  # a short sequence: not split
        assert chunks[-1] >= last
    assert chunks[2] <= max(1, 1 << (shape[2] - 1).bit_length()), "samples: at most the batch, rounded up"
    if leaf == "attn":
        assert chunks[3] <= shape[3], "heads: at most all of them"
    big = nbytes * 2 > layout_module._SMALL_CHUNK_BYTES
    whole = chunks[2] >= shape[2] and (leaf != "attn" or chunks[3] == shape[3])
    assert big or whole, f"a small chunk {chunks} should have taken more heads and samples"


def test_large_attn_is_split_along_its_rows_and_keeps_one_head():
    chunks = chunk_shape((1, 1, 2, 32, 8192, 8192), 4, "attn")
    assert chunks[3] == 1 and chunks[5] == 8192 and chunks[4] < 8192
    assert math.prod(chunks) * 4 <= 8 << 20


# -- the array layout -------------------------------------------------------------------------------
def test_put_creates_room_for_steps_and_grows_the_step_axis_by_doubling(backend):
    layout = ArrayLayout(backend, StoreOptions())
    module = {"name": MODULE, "dtype": "float32", "source_dtype": "float32"}
    block = np.ones((1, HEADS, 3, DIM), dtype=np.float32)
    layout.put(module, "q", (0, 0), (slice(None), slice(0, 3)), block)
    path = module_path(MODULE, "q")
    assert backend.shape(path) == (64, 1, 1, HEADS, 3, DIM)
    layout.put(module, "q", (64, 1), (slice(None), slice(2, 5)), 2 * block)
    assert backend.shape(path) == (128, 2, 1, HEADS, 5, DIM) == layout.shape_of(path)
    assert layout.bytes_written == 2 * block.nbytes
    np.testing.assert_array_equal(backend.read(path, (64, 1, 0, 0, slice(2, 5))), 2 * block[0, 0])
    assert (backend.read(path, (64, 1, 0, 0, slice(0, 2))) == 0).all()


class _ZstdMemory(MemoryBackend):
    """The in-memory backend with a compressing default codec (as Zarr's and HDF5's are)."""

    default_codec: ClassVar[Codec] = Codec("zstd", 1)


def test_float_leaves_are_raw_unless_compression_was_given_or_bfloat16_was_widened():
    location = f"memory://test-write-{uuid.uuid4().hex}"
    backend = _ZstdMemory.open(location, "w-")
    try:
        layout = ArrayLayout(backend, StoreOptions(codec=None))
        module = {"name": MODULE, "dtype": "float32", "source_dtype": "float32"}
        assert layout.codec_for("q", module) == Codec("none", 0, skip_empty=False)
        assert layout.codec_for("summary/entropy", module) == Codec("none", 0, skip_empty=False)
        assert layout.codec_for("attn", module) == layout.codec == Codec("zstd", 1)
        widened = {**module, "source_dtype": "bfloat16"}  # bfloat16 widened: its low halves are zeros
        assert layout.codec_for("k", widened) == Codec("zstd", 1, skip_empty=False)
        given = ArrayLayout(backend, StoreOptions(codec=Codec("gzip", 3)))
        assert given.codec_for("k", module) == Codec("gzip", 3, skip_empty=False)
    finally:
        MemoryBackend.delete(location)


def test_lse_fills_with_minus_infinity(backend):
    layout = ArrayLayout(backend, StoreOptions())
    module = {"name": MODULE, "dtype": "float32", "source_dtype": "float32"}
    layout.put(module, "lse", (0, 0), (slice(None), slice(0, 2)), np.zeros((1, HEADS, 2), np.float32))
    layout.put(module, "lse", (1, 0), (slice(None), slice(0, 4)), np.zeros((1, HEADS, 4), np.float32))
    assert np.isneginf(backend.read(module_path(MODULE, "lse"), (0, 0, 0, 0, slice(2, 4)))).all()


def test_write_at_resets_the_rest_of_the_row(backend):
    layout = ArrayLayout(backend, StoreOptions())
    layout.ensure("tokens/ids", (1, 2, 5), "int64", (1, 2, 5), -1)
    layout.write_at("tokens/ids", (0, slice(0, 2), slice(0, 5)), np.arange(10).reshape(2, 5), fill=-1)
    layout.write_at("tokens/ids", (0, slice(0, 1), slice(0, 3)), np.array([[7, 8, 9]]), fill=-1)
    np.testing.assert_array_equal(backend.read("tokens/ids", (0,)), [[7, 8, 9, -1, -1], [-1] * 5])


# -- the staging budget -----------------------------------------------------------------------------
def test_budget_refuses_a_record_larger_than_itself_with_the_fix():
    with pytest.raises(StoreOptionError, match=r"pass buffer= of at least 2 KiB"):
        Budget(1024).acquire(2048, wait=True)


def test_budget_blocks_until_released_and_counts_the_wait():
    budget = Budget(100)
    assert budget.acquire(80, wait=True) and not budget.acquire(40, wait=False)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: budget.acquire(40, wait=True) and got.set())
    waiter.start()
    assert not got.wait(0.1), "the producer must wait while the budget is spent"
    budget.release(80)
    assert got.wait(5)
    waiter.join(5)
    assert budget.used == 40 and budget.peak == 80 and budget.blocked_s > 0


@pytest.mark.parametrize(
    ("error", "expected"),
    [(OSError(errno.ENOSPC, "No space left on device"), StoreFullError), (RuntimeError("boom"), StoreWriteError)],
)
def test_budget_failure_releases_waiting_producers_with_a_typed_error(error, expected):
    budget = Budget(100)
    budget.acquire(100, wait=True)
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            budget.acquire(10, wait=True)
        except BaseException as err:
            raised.append(err)

    waiter = threading.Thread(target=produce)
    waiter.start()
    budget.fail(error)
    waiter.join(5)
    assert not waiter.is_alive() and len(raised) == 1
    assert type(raised[0]) is expected and raised[0].__cause__ is error
    assert type(surface(error)) is expected
    with pytest.raises(expected, match="committed before stay readable"):
        budget.acquire(1, wait=False)


# -- per-call state and the commit ------------------------------------------------------------------
def test_a_cut_call_keeps_its_rows_and_keys_before_the_crop():
    state = new_call(_record(4))
    state.stored = [True] * 4
    for pos in (4, 5, 6):
        state.extend(_record(1, q_offset=pos), 1)
        state.stored.append(True)
    assert (state.q_len, state.k_len, state.rowkeys) == (7, 7, [4, 4, 4, 4, 5, 6, 7])
    state.cut(rows=5, keys=5)
    assert (state.q_len, state.k_len, state.rowkeys, len(state.stored)) == (5, 5, [4, 4, 4, 4, 5], 5)
    state.extend(_record(2, q_offset=5), 2)  # the accepted tokens after the crop
    assert (state.q_len, state.k_len, state.rowkeys) == (7, 7, [4, 4, 4, 4, 5, 7, 7])


def test_commit_writes_the_tables_of_a_cut_call_and_then_committed(backend):
    layout = ArrayLayout(backend, StoreOptions())
    commits = Commits(layout, Start())
    first = _record(4)
    module = commits.module(first, 0)
    assert module["name"] == MODULE and module["heads"] == HEADS
    step = OpenStep(0)
    state = step.calls.setdefault(MODULE, {})[0] = new_call(first)
    for pos in (4, 5):
        state.extend(_record(1, q_offset=pos), 1)
    state.cut(rows=5, keys=5)
    commits.commit(step, 7)
    assert int(backend.read(module_path(MODULE, "calls"), (0,))) == 1
    info = _info(backend, 0)
    assert (info["q_len"], info["k_len"], info["batch"], info["causal"]) == (5, 5, 1, 1)
    rowkeys = backend.read(module_path(MODULE, "rowkeys"), (0, 0))
    assert list(rowkeys[:5]) == [4, 4, 4, 4, 5]
    assert int(backend.read("steps", (0,))) == 7 and backend.attrs("")["committed"] == 1


def test_writer_commits_a_cropped_kv_cache_stream(backend):
    writer = StoreWriter(backend, StoreOptions(buffer=1 << 20), {})
    writer.begin_step(0)
    records = [_record(4), _record(1, q_offset=4), _record(1, q_offset=5), _record(1, q_offset=6)]
    for rec in records:
        nbytes = sum(t.numel() * t.element_size() for t in (rec.q, rec.k, rec.attn) if t is not None)
        assert writer.admit(nbytes)
        writer.put(rec, nbytes)
    writer.cut(MODULE, 0, rows=5, keys=5)  # rows 5 and 6 were rejected draft tokens
    writer.end_step()
    writer.close()
    assert writer.budget.used == 0, "held continuation rows give their staging back"
    info = _info(backend, 0)
    assert (info["q_len"], info["k_len"], info["k_stored"]) == (5, 5, 7)
    assert list(stacked_view(backend).read(module_path(MODULE, "rowkeys"), (0, 0))[:5]) == [4, 4, 4, 4, 5]
    attn = backend.read(module_path(MODULE, "attn"), (0, 0, 0, 0))
    np.testing.assert_allclose(attn[4, :5], records[1].attn[0, 0, 0].numpy())
    assert backend.attrs("")["status"] == "complete" and backend.attrs("")["committed"] == 1


def test_contiguous_continuations_merge_into_one_slab():
    parts = [_record(1, q_offset=4), _record(1, q_offset=5), _record(1, q_offset=7)]
    merged = merge_contiguous(parts)
    assert [(m.q_offset, m.q.shape[2], m.k_len) for m in merged] == [(4, 2, 6), (7, 1, 8)]
    assert merged[0].mask is parts[1].mask


@pytest.mark.parametrize("module", [budget_module, layout_module, options_module])
def test_docstring_examples_run(module):
    failed, tried = doctest.testmod(module, raise_on_error=False)
    assert tried and not failed


def test_records_reach_the_writer_thread_in_batches_and_in_order(backend, monkeypatch):
    """Each hand-over wakes the writer thread (a GIL round trip): records go in batches of up to
    64, flushed by any other message, so the order the writer sees is the order they were put."""
    monkeypatch.setattr("attnhooks.write.outbox.BATCH", 8)
    writer = StoreWriter(backend, StoreOptions(buffer=1 << 30), {})
    sent = []

    class Seen:  # the writer's queue, its messages listed (the thread keeps getting from the real one)
        def __init__(self, real):
            self.real = real

        def put(self, msg):
            batch = isinstance(msg, tuple) and msg[0] == "batch"
            sent.append(("batch", list(msg[1])) if batch else msg)  # (the writer empties the batch)
            self.real.put(msg)

        def __getattr__(self, name):
            return getattr(self.real, name)

    writer._out._queue = Seen(writer._out._queue)
    for step in range(3):
        writer.begin_step(step)
        for call in range(20):
            rec = _record(1, q_offset=call)
            rec.step = step
            nbytes = sum(t.numel() * t.element_size() for t in (rec.q, rec.k, rec.attn))
            assert writer.admit(nbytes)
            writer.put(rec, nbytes)
        writer.end_step()
    writer.close()
    kinds = [m[0] if isinstance(m, tuple) else "stop" for m in sent]
    assert kinds.count("batch") == 3 * 3  # 8 + 8 + 4 records a step, the last 4 handed over by the commit
    assert kinds[:5] == ["begin", "batch", "batch", "batch", "commit"]
    assert [len(m[1]) for m in sent if isinstance(m, tuple) and m[0] == "batch"][:3] == [8, 8, 4]
    assert writer.budget.used == 0 and backend.attrs("")["committed"] == 3


def test_a_full_budget_hands_the_waiting_records_over_instead_of_waiting_for_them(backend):
    """Records not yet handed over could never free their staging: an admit that would wait (or drop)
    for lack of room hands them over first."""
    rec = _record(4)
    nbytes = sum(t.numel() * t.element_size() for t in (rec.q, rec.k, rec.attn))
    writer = StoreWriter(backend, StoreOptions(buffer=5 * nbytes, when_full="block"), {})
    writer.begin_step(0)
    done = threading.Event()

    def produce():
        for _ in range(40):  # 8 budgets' worth: the writer must free room 35 times
            assert writer.admit(nbytes)
            writer.put(_record(4), nbytes)
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert done.wait(30), "the producer waited for room that records it still held would free"
    writer.end_step()
    writer.close()
    assert writer.budget.peak <= 5 * nbytes


def test_a_writer_of_a_fresh_store_never_asks_whether_a_path_exists_and_writes_the_same_store():
    """A store the capture created (or overwrote) holds nothing the writer did not make: asking the
    backend about each module's ~10 paths cost 20-40 µs an ask (h5py, a file system's stat) with the GIL
    held. The stacks layer still asks about its own few arrays, once a store."""
    stores = {}
    for fresh in (False, True):
        location = f"memory://test-fresh-{uuid.uuid4().hex}"
        backend = MemoryBackend.open(location, "w-", root_attrs(MemoryBackend, StoreOptions(), {}))
        asked = []
        real = backend.contains
        backend.contains = lambda path, real=real, asked=asked: asked.append(path) or real(path)
        writer = StoreWriter(backend, StoreOptions(buffer=1 << 20), {}, fresh=fresh)
        for step in range(2):
            writer.begin_step(step)
            for rec in (_record(4), _record(1, q_offset=4)):
                nbytes = sum(t.numel() * t.element_size() for t in (rec.q, rec.k, rec.attn) if t is not None)
                assert writer.admit(nbytes)
                writer.put(rec, nbytes)
            writer.end_step()
        writer.close()
        view = stacked_view(backend)
        stores[fresh] = {
            leaf: view.read(module_path(MODULE, leaf), (slice(0, 2),)) for leaf in ("q", "k", "attn", "info", "rowkeys")
        }
        of_modules = [path for path in asked if not path.startswith("stacks")]  # (the stacks: a few asks a store)
        assert (len(of_modules) > 0) is not fresh, of_modules
        MemoryBackend.delete(location)
    for leaf, values in stores[False].items():
        np.testing.assert_array_equal(stores[True][leaf], values, err_msg=leaf)
