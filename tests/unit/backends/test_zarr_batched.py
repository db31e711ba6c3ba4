"""Zarr's batched writes (the writer hands a message's writes over together): the same values as
one write at a time, writes to one chunk kept in order, a read or structure change inside a batch
sees every write before it, and a batch that raises writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from attnhooks.backends.base import Codec
from attnhooks.backends.zarrstore import ZarrBackend


@pytest.fixture
def backend(tmp_path):
    be = ZarrBackend.open(str(tmp_path / "b.zarr"), "w-", {"x": 1})
    for name in ("a", "b"):
        be.create_array(name, (4, 8), "float32", (2, 8), 0.0, Codec("zstd", 1))
    yield be
    be.close()


def test_batched_writes_equal_single_writes_and_keep_order(backend):
    with backend.batched():
        backend.write("a", (0, slice(0, 4)), np.ones(4, np.float32))
        backend.write("a", (0, slice(2, 6)), np.full(4, 2, np.float32))  # the same chunk: applied after
        backend.write("b", (3,), np.arange(8, dtype=np.float32))
        assert backend.read("a", (0,))[:6].tolist() == [1, 1, 2, 2, 2, 2]  # a read flushes what is held
        backend.write("a", (1,), np.full(8, 5, np.float32))
        backend.resize("a", (6, 8))  # a structure change too
        backend.write("a", (5,), np.full(8, 7, np.float32))
    assert backend.read("a", (1,)).tolist() == [5] * 8
    assert backend.read("a", (5,)).tolist() == [7] * 8
    assert backend.read("b", (3,)).tolist() == list(range(8))


def test_a_batch_that_raises_writes_nothing_held(backend):
    with pytest.raises(RuntimeError), backend.batched():
        backend.write("a", (2,), np.full(8, 9, np.float32))
        raise RuntimeError("the writer failed mid-message")
    assert backend.read("a", (2,)).tolist() == [0] * 8
    backend.write("a", (2,), np.full(8, 3, np.float32))  # not batched any more
    assert backend.read("a", (2,)).tolist() == [3] * 8
