"""Stacked module arrays (schema ``attnhooks/2``, :mod:`attnhooks.backends.stacks`): a store whose
small per-module arrays live in stacks reads exactly as one with an array per module.

The differential test drives a plain backend and a :class:`StackedBackend` over the same kind of
backend with the same random writer-like operations (members created as modules appear, whole and
partial writes, growth along the step and sequence axes, a shrink, flushes at commits) and
compares every read, through the writer's instance and through a reader that opens the store anew.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnhooks.backends import Codec
from attnhooks.backends.stacks import GROUP, StackedBackend, stacked_view
from attnhooks.errors import StoreCorruptError
from tests.unit.backends.conformance import CLASSES, _forget, _location

KINDS = ("memory", "zarr", "hdf5")
LEAVES = {  # leaf: (dtype, shape at creation, chunks, fill)
    "q": ("float32", (4, 1, 2, 2, 8, 4), (1, 1, 2, 2, 8, 4), 0.0),
    "lse": ("float32", (4, 1, 2, 2, 8), (1, 1, 2, 2, 8), -np.inf),
    "calls": ("int64", (4,), (1024,), 0),
    "info": ("int64", (4, 1, 12), (1, 64, 12), 0),
}
CODEC = Codec("none", 0)


def _open(kind, location, mode):
    return CLASSES[kind].open(location, mode)


def _pair(kind, tmp_path):
    a, b = _location(kind, tmp_path / "plain"), _location(kind, tmp_path / "stacked")
    for folder in (tmp_path / "plain", tmp_path / "stacked"):
        folder.mkdir()
    return a, b


def _random_selection(rng, shape):
    sel = []
    for n in shape:
        choice = rng.integers(3)
        if choice == 0:
            sel.append(int(rng.integers(n)))
        elif choice == 1:
            start = int(rng.integers(n))
            sel.append(slice(start, int(rng.integers(start, n)) + 1))
        else:
            sel.append(slice(None))
    return tuple(sel)


def _run(rng, plain, stacked, modules=3, steps=6):
    """Writer-like operations on both backends; returns the member paths."""
    paths = []
    for step in range(steps):
        for m in range(modules if step else modules - 1):  # a module first seen at step 1
            for leaf, (dtype, shape, chunks, fill) in LEAVES.items():
                path = f"modules/m{m}/{leaf}"
                if path not in paths:
                    for be in (plain, stacked):
                        be.create_array(path, shape, dtype, chunks, fill, CODEC)
                    paths.append(path)
                have = plain.shape(path)
                need = list(have)
                need[0] = max(have[0], step + 1)
                if leaf in ("q", "lse") and rng.random() < 0.3:
                    need[4] = have[4] + int(rng.integers(1, 9))  # a longer sequence
                if tuple(need) != have:
                    for be in (plain, stacked):
                        be.resize(path, tuple(need))
                shape = tuple(need)
                if rng.random() < 0.7:  # a whole row of the step, else a part of it
                    sel = (step, *(slice(0, n) for n in shape[1:]))
                else:
                    sel = (step, *(slice(int(rng.integers(n)), n) for n in shape[1:]))
                extent = [s.stop - s.start for s in sel if isinstance(s, slice)]
                value = (rng.standard_normal(extent) * 10).astype(dtype)
                for be in (plain, stacked):
                    be.write(path, sel, value)
        if step == 3:  # a shrink of one sequence axis (repair's trim cuts the step axis the same way)
            path = "modules/m0/q"
            cut = (*plain.shape(path)[:4], max(1, plain.shape(path)[4] - 3), plain.shape(path)[5])
            for be in (plain, stacked):
                be.resize(path, cut)
        for be in (plain, stacked):
            be.flush()
        _compare(rng, plain, stacked, paths)
    return paths


def _compare(rng, plain, other, paths, rounds=4):
    for path in paths:
        assert other.contains(path) and other.shape(path) == plain.shape(path), path
        assert other.dtype(path) == plain.dtype(path)
        np.testing.assert_array_equal(other.read(path), plain.read(path), err_msg=path)
        for _ in range(rounds):
            sel = _random_selection(rng, plain.shape(path))
            np.testing.assert_array_equal(other.read(path, sel), plain.read(path, sel), err_msg=f"{path}{sel}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stacked_arrays_read_as_arrays_of_their_own(kind, seed, tmp_path):
    rng = np.random.default_rng(seed)
    a, b = _pair(kind, tmp_path)
    plain, inner = _open(kind, a, "w-"), _open(kind, b, "w-")
    stacked = StackedBackend(inner, stacking=True)
    try:
        paths = _run(rng, plain, stacked)
        assert inner.children(GROUP) == sorted([*(f"{leaf}.0" for leaf in LEAVES), "spare"])  # (SPARE)
        assert not inner.contains("modules/m0/q")  # stored in the stack, not on its own
        assert stacked.children("modules/m0") == sorted(LEAVES)
        stacked.close()
        reader = stacked_view(_open(kind, b, "r"))
        _compare(rng, plain, reader, paths, rounds=20)
        reader.close()
    finally:
        plain.close()
        _forget(a)
        _forget(b)


@pytest.mark.parametrize("kind", ("zarr", "hdf5"))
def test_appending_to_stacks_keeps_what_they_hold(kind, tmp_path):
    """A writer appending to a stacked store: earlier steps stay, new steps of old members go into
    their stacks, a new module gets a stack of its own."""
    rng = np.random.default_rng(5)
    a, b = _pair(kind, tmp_path)
    plain = _open(kind, a, "w-")
    stacked = StackedBackend(_open(kind, b, "w-"), stacking=True)
    paths = _run(rng, plain, stacked, steps=3)
    stacked.close()
    again = StackedBackend(_open(kind, b, "r+"), stacking=True)
    for be in (plain, again):
        be.resize("modules/m1/q", (8, *plain.shape("modules/m1/q")[1:]))
        be.write("modules/m1/q", (5,), np.ones(plain.shape("modules/m1/q")[1:], dtype=np.float32))
        be.write("modules/m1/calls", (slice(0, 3),), np.array([7, 8, 9]))  # a part of a chunk written before
    for be in (plain, again):
        be.create_array("modules/new/q", LEAVES["q"][1], "float32", LEAVES["q"][2], 0.0, CODEC)
        be.write("modules/new/q", (1,), np.full(LEAVES["q"][1][1:], 2.0, dtype=np.float32))
        be.flush()
    paths.append("modules/new/q")
    _compare(rng, plain, again, paths)
    again.close()
    reader = stacked_view(_open(kind, b, "r"))
    _compare(rng, plain, reader, paths, rounds=10)
    assert {s for s in reader.unwrapped.children(GROUP)} >= {"q.0", "q.1"}
    reader.close()
    plain.close()


def test_a_damaged_stack_chunk_names_the_member_and_its_step(tmp_path):
    """A stack chunk failing its checksum is reported as the member's array, at the member's chunk."""
    location = str(tmp_path / "s.zarr")
    inner = CLASSES["zarr"].open(location, "w-")
    stacked = StackedBackend(inner, stacking=True)
    checked = Codec("none", 0, checksum=True)
    for m in range(2):
        stacked.create_array(f"modules/m{m}/q", (3, 1, 2, 2, 8, 4), "float32", (1, 1, 2, 2, 8, 4), 0.0, checked)
        for step in range(3):
            stacked.write(f"modules/m{m}/q", (step,), np.ones((1, 2, 2, 8, 4), dtype=np.float32))
    stacked.flush()
    stacked.close()
    chunk = tmp_path / "s.zarr" / "stacks" / "q.0" / "c.1.0.0.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    reader = stacked_view(CLASSES["zarr"].open(location, "r"))
    assert reader.read("modules/m1/q", (0,)).shape == (1, 2, 2, 8, 4)
    with pytest.raises(StoreCorruptError) as info:
        reader.read("modules/m1/q", (slice(0, 3),))
    assert info.value.array == "modules/m1/q" and list(info.value.chunks) == [(1, 0, 0, 0, 0, 0)]
    chunk.unlink()
    assert reader.missing_chunks("modules/m0/q", (slice(0, 3),)) == [(1, 0, 0, 0, 0, 0)]


def test_a_long_step_is_written_out_before_its_commit_with_memory_bounded(tmp_path, monkeypatch):
    """A step longer than the held-chunk bound (a long generation, rows appended slab by slab) has
    its chunks written out early: memory stays bounded, reads are exact."""
    import attnhooks.backends.stackchunks as stackchunks

    monkeypatch.setattr(stackchunks, "_CACHE_BYTES", 64 << 10)  # 64 KiB kept, 128 KiB before writing out
    a, b = _pair("zarr", tmp_path)
    plain, stacked = _open("zarr", a, "w-"), StackedBackend(_open("zarr", b, "w-"), stacking=True)
    shape, chunks = (1, 1, 1, 2, 16, 8), (1, 1, 1, 2, 16, 8)  # 1 KiB per module chunk
    rng = np.random.default_rng(0)
    peak = 0
    for be in (plain, stacked):
        for m in range(4):
            be.create_array(f"modules/m{m}/q", shape, "float32", chunks, 0.0, CODEC)
    for rows in range(16, 16 * 200, 16):  # a slab of 16 rows per module, 200 times: 800 KiB in all
        for m in range(4):
            path = f"modules/m{m}/q"
            grown = (1, 1, 1, 2, rows + 16, 8)
            slab = rng.standard_normal((1, 1, 1, 2, 16, 8)).astype(np.float32)
            for be in (plain, stacked):
                be.resize(path, grown)
                be.write(path, (slice(0, 1), slice(0, 1), slice(0, 1), slice(None), slice(rows, rows + 16)), slab)
            peak = max(peak, stacked._held._bytes)
    assert peak <= (128 << 10) + 4 * 1024, f"held {peak} bytes"
    for be in (plain, stacked):
        be.flush()
    _compare(rng, plain, stacked, [f"modules/m{m}/q" for m in range(4)], rounds=10)
    stacked.close()
    _compare(rng, plain, stacked_view(_open("zarr", b, "r")), [f"modules/m{m}/q" for m in range(4)], rounds=10)
    plain.close()


def test_unreadable_stacks_of_a_store_that_committed_nothing_are_not_needed(tmp_path, monkeypatch):
    """A writer killed while creating its first stacks (HDF5 may then leave the group unreadable):
    with nothing committed the store is read without them; with steps committed the error stands."""
    location = str(tmp_path / "s.h5")
    stacked = StackedBackend(_open("hdf5", location, "w-"), stacking=True)
    stacked.create_array("modules/m0/q", LEAVES["q"][1], "float32", LEAVES["q"][2], 0.0, CODEC)
    stacked.flush()
    stacked.close()

    def unreadable(self, backend, stacking):
        raise KeyError("Unable to synchronously open object (address of object past end of allocation)")

    monkeypatch.setattr(StackedBackend, "__init__", unreadable)
    reader = _open("hdf5", location, "r")
    try:
        assert stacked_view(reader, committed=0) is reader
        with pytest.raises(KeyError, match="past end of allocation"):
            stacked_view(reader, committed=1)
    finally:
        reader.close()


def test_the_description_is_flushed_in_its_spare_copy_before_its_own(tmp_path):
    """At a flush that changes the description, the spare copy is written and flushed before the ``stacks``
    group's own is touched (a kill in either write then leaves the other whole); a reader whose group
    copy does not read takes the spare's."""
    from attnhooks.backends.memory import MemoryBackend
    from attnhooks.backends.stacks import ATTR, SPARE

    log: list[tuple[str, ...]] = []

    class Logged(MemoryBackend):
        def set_attrs(self, path, values):
            log.append(("set_attrs", path, *sorted(values)))
            super().set_attrs(path, values)

        def flush(self):
            log.append(("flush",))

    inner = Logged.open(f"memory://{tmp_path.name}-spare", "w")
    stacked = StackedBackend(inner, stacking=True)
    dtype, shape, chunks, fill = LEAVES["q"]
    stacked.create_array("modules/m0/q", shape, dtype, chunks, fill, CODEC)
    stacked.write("modules/m0/q", (0,), np.ones(shape[1:], dtype=dtype))
    log.clear()
    stacked.flush()
    assert log == [("set_attrs", SPARE, ATTR), ("flush",), ("set_attrs", GROUP, ATTR), ("flush",)]
    assert inner.attrs(SPARE) == inner.attrs(GROUP)
    log.clear()
    stacked.flush()  # nothing changed: neither copy is rewritten
    assert log == [("flush",)]

    class Torn(MemoryBackend):
        def attrs(self, path):
            if path == GROUP:
                raise OSError("Can't synchronously read data (Expected global heap object size does not match)")
            return super().attrs(path)

    torn = Torn.open(f"memory://{tmp_path.name}-spare", "r+")  # (the same store)
    reader = stacked_view(torn)
    assert reader.shape("modules/m0/q") == shape
    np.testing.assert_array_equal(reader.read("modules/m0/q", (0,)), np.ones(shape[1:], dtype=dtype))
    torn.remove(SPARE)
    with pytest.raises(OSError, match="global heap"):  # no spare: the error, as before
        stacked_view(torn)
