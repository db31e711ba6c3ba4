"""The backend conformance suite: every test of the storage backend protocol, driven directly
(numpy in, numpy out), as the methods of :class:`BackendConformance`, in the manner of
``zarr.testing.store.StoreTests``.

A backend runs the suite by subclassing it in a test module (a file named ``test_*.py``, the
class named ``Test*``) and saying which backend it is; the suite's fixtures (``kind``,
``location``, ``backend``) come with the class::

    from tests.unit.backends.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        engine = "mine"  # the name the tests know it by (the ``kind`` fixture)
        backend_class = MyBackend  # what ``backend_class.open(location, mode)`` opens

That is all for a backend of files or directories under a local path: each test gets a fresh
``tmp_path / "s<first suffix of backend_class>"``. A backend elsewhere (a URL scheme of its own)
overrides :meth:`BackendConformance.new_location` (a fresh, not yet existing location) and
:meth:`BackendConformance.forget_location` (delete what a test left there). The built-in
backends' subclasses are in ``test_conformance.py``.

The module also holds the helpers shared with the other backend and store tests
(``tests/unit/backends/test_registry.py``, ``tests/integration/test_store_backends.py``):
the built-in kinds and their classes, fresh locations and their clean-up, and the bit-for-bit
comparison of a store with the records of a capture.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

import fsspec
import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.backends import Backend, Codec
from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend

BACKENDS = ("memory", "zarr", "hdf5")
KINDS = (*BACKENDS, "fsspec")  # fsspec: the zarr backend on a memory:// URL, through zarr's FsspecStore
CLASSES = {"memory": MemoryBackend, "zarr": ZarrBackend, "hdf5": HDF5Backend, "fsspec": ZarrBackend}
ALL = ("attn", "q", "k", "lse")


def _location(kind: str, tmp_path) -> str:
    if kind == "memory":
        return f"memory://test-backends-{uuid.uuid4().hex}"
    if kind == "fsspec":
        return f"memory://test-backends-{uuid.uuid4().hex}/s.zarr"
    return str(tmp_path / ("s.zarr" if kind == "zarr" else "s.h5"))


def _forget(location: str) -> None:
    """Delete what a test left at a memory:// location: an in-process store, or the folder of a
    Zarr store on fsspec's memory file system (``memory://test-backends-<uuid>/...``)."""
    if not location.startswith("memory://"):
        return  # under tmp_path
    MemoryBackend.delete(location)
    fs = fsspec.filesystem("memory")
    folder = "/" + location.removeprefix("memory://").split("/")[0]
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def _codec(be) -> Codec:
    return type(be).default_codec


# ================================================================================================
# Backend protocol
# ================================================================================================

NUMERIC = {
    "float32": lambda rng, shape: rng.standard_normal(shape).astype(np.float32),
    "float16": lambda rng, shape: rng.standard_normal(shape).astype(np.float16),
    "int64": lambda rng, shape: rng.integers(-(2**40), 2**40, shape, dtype=np.int64),
    "bool": lambda rng, shape: rng.random(shape) < 0.5,
}
FILLS = {"float32": -1.5, "float16": 0.25, "int64": -7, "bool": True}


def _check_numeric_arrays(backend):
    rng = np.random.default_rng(0)
    for dtype, make in NUMERIC.items():
        path = f"g/{dtype}"
        backend.create_array(path, (3, 4, 5), dtype, (1, 2, 5), FILLS[dtype], _codec(backend))
        assert backend.shape(path) == (3, 4, 5)
        assert backend.dtype(path) == dtype
        fresh = backend.read(path)
        assert fresh.dtype == np.dtype(dtype), dtype
        assert np.array_equal(fresh, np.full((3, 4, 5), FILLS[dtype], dtype=dtype)), f"{dtype}: unwritten cells"

        whole = make(rng, (3, 4, 5))
        backend.write(path, (), whole)
        assert np.array_equal(backend.read(path), whole), dtype

        part = make(rng, (2, 3))
        backend.write(path, (1, slice(1, 3), slice(2, 5)), part)
        whole[1, 1:3, 2:5] = part
        got = backend.read(path)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, whole), dtype
        assert np.array_equal(backend.read(path, (2,)), whole[2]), dtype
        assert np.array_equal(backend.read(path, (slice(0, 2), 3, slice(1, 4))), whole[0:2, 3, 1:4]), dtype
        assert np.array_equal(backend.read(path, (1, 2, 4)), whole[1, 2, 4]), dtype
    assert backend.children("g") == sorted(NUMERIC)


def _check_float_bits(backend):
    """Signed zeros, infinities, NaN payloads, subnormals: stored bits come back unchanged."""
    bits = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001, 0x3F800001], np.uint32)
    values = bits.view(np.float32)
    backend.create_array("x", (len(values),), "float32", (4,), 0.0, _codec(backend))
    backend.write("x", (), values)
    assert np.array_equal(backend.read("x").view(np.uint32), bits)
    half_bits = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x3C01, 0x7BFF], np.uint16)
    backend.create_array("h", (len(half_bits),), "float16", (4,), 0.0, _codec(backend))
    backend.write("h", (), half_bits.view(np.float16))
    assert np.array_equal(backend.read("h").view(np.uint16), half_bits)


def _check_string_arrays(backend):
    backend.create_array("t", (2, 4), "str", (1, 4), "", _codec(backend))
    assert backend.dtype("t") == "str"
    assert backend.read("t").tolist() == [[""] * 4] * 2, "unwritten strings are empty"
    row = np.array(["a", "héllo wörld", "", "▁token"], dtype=object)
    backend.write("t", (1,), row)
    backend.write("t", (0, slice(1, 3)), np.array(['{"x"', "null"], dtype=object))
    got = backend.read("t")
    assert got.shape == (2, 4)
    assert [[str(s) for s in r] for r in got] == [["", '{"x"', "null", ""], ["a", "héllo wörld", "", "▁token"]]
    assert [str(s) for s in backend.read("t", (1, slice(1, 3)))] == ["héllo wörld", ""]
    backend.resize("t", (3, 5))
    got = backend.read("t")
    assert [[str(s) for s in r] for r in got] == [
        ["", '{"x"', "null", "", ""],
        ["a", "héllo wörld", "", "▁token", ""],
        [""] * 5,
    ]


def _check_resize(backend):
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    backend.create_array("x", (4, 6), "float32", (2, 4), -1.0, _codec(backend))
    backend.write("x", (), data)
    backend.resize("x", (7, 9))  # grow: data kept, fill outside
    assert backend.shape("x") == (7, 9)
    expected = np.full((7, 9), -1.0, np.float32)
    expected[:4, :6] = data
    assert np.array_equal(backend.read("x"), expected)
    backend.resize("x", (3, 5))  # shrink: the common region kept
    assert backend.shape("x") == (3, 5)
    assert np.array_equal(backend.read("x"), data[:3, :5])
    backend.resize("x", (0, 5))
    assert backend.shape("x") == (0, 5) and backend.read("x").shape == (0, 5)


ATTRS = {
    "none": None,
    "int": 7,
    "big": 2**40,
    "neg": -3,
    "float": 0.1,
    "whole_float": 2.0,
    "true": True,
    "false": False,
    "text": "plain",
    "empty": "",
    "unicode": "héllo ▁",
    "brace": "{x",
    "bracket": "[1, 2",
    "quoted": '"q"',
    "null_text": "null",
    "json_text": '{"a": 1}',
    "list": [1, 2.5, "x", None, True],
    "empty_list": [],
    "empty_dict": {},
    "nested": {"a": {"b": [1, {"c": None, "d": "null"}]}, "e": [[1, 2], [3]], "f": False},
}


def _check_attrs(backend):
    backend.create_group("g")
    backend.create_array("g/x", (2,), "int64", (2,), 0, _codec(backend))
    assert backend.attrs("g") == {} and backend.attrs("g/x") == {}
    for path in ("", "g", "g/x"):
        backend.set_attrs(path, ATTRS)
        got = backend.attrs(path)
        assert got == ATTRS, path
        for key, value in ATTRS.items():  # 1 == True == 1.0 in Python: check the types too
            assert type(got[key]) is type(value), (path, key, got[key])
    backend.set_attrs("g", {"int": 8, "added": [1]})  # an update, not a replacement
    assert backend.attrs("g") == {**ATTRS, "int": 8, "added": [1]}
    assert backend.attrs("") == ATTRS


def _check_children_and_contains(backend):
    codec = _codec(backend)
    assert backend.contains("")
    assert backend.children("") == []
    backend.create_group("a")
    backend.create_group("a/b")
    backend.create_array("a/x", (1,), "int64", (1,), 0, codec)
    backend.create_array("a/b/deep/y", (2, 2), "float32", (1, 2), 0.0, codec)  # parents made on the way
    backend.create_array("z", (1,), "str", (1,), "", codec)
    assert backend.children("") == ["a", "z"]
    assert backend.children("a") == ["b", "x"]
    assert backend.children("a/b") == ["deep"]
    assert backend.children("a/b/deep") == ["y"]
    assert backend.children("a/x") == [], "an array has no children"
    for path in ("a", "a/b", "a/x", "a/b/deep", "a/b/deep/y", "z"):
        assert backend.contains(path), path
    for path in ("b", "a/y", "a/b/x", "zz", "a/x/y"):
        assert not backend.contains(path), path
    backend.create_group("a")  # again: no error, nothing lost
    assert backend.children("a") == ["b", "x"]
    backend.write("a/x", (), np.array([5]))
    backend.create_array("a/x", (3,), "float32", (3,), 1.0, codec)  # again: replaced
    assert backend.shape("a/x") == (3,) and backend.dtype("a/x") == "float32"
    assert np.array_equal(backend.read("a/x"), np.ones(3, np.float32))


def _check_reopen_read_only(cls, location):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    be = cls.open(location, "w")
    assert not be.readonly
    be.create_array("g/x", (3, 4), "float32", (1, 4), 0.0, cls.default_codec)
    be.write("g/x", (), data)
    be.set_attrs("", {"k": "v"})
    be.set_attrs("g", ATTRS)
    be.flush()
    be.close()
    assert cls.exists(location)

    be = cls.open(location, "r")
    try:
        assert be.readonly
        assert be.children("") == ["g"] and be.shape("g/x") == (3, 4) and be.dtype("g/x") == "float32"
        assert np.array_equal(be.read("g/x"), data)
        assert be.attrs("") == {"k": "v"} and be.attrs("g") == ATTRS
        # the engines raise their own errors here (PermissionError, ValueError, OSError...): any is fine
        with pytest.raises(Exception):  # noqa: B017
            be.write("g/x", (0,), np.zeros(4, np.float32))
        with pytest.raises(Exception):  # noqa: B017
            be.set_attrs("", {"k": "changed"})
        with pytest.raises(Exception):  # noqa: B017
            be.create_array("y", (1,), "int64", (1,), 0, cls.default_codec)
        with pytest.raises(Exception):  # noqa: B017
            be.resize("g/x", (1, 1))
    finally:
        be.close()
    be = cls.open(location, "r")
    try:
        assert np.array_equal(be.read("g/x"), data), "a refused write changed nothing"
        assert be.attrs("") == {"k": "v"} and be.children("") == ["g"]
    finally:
        be.close()

    be = cls.open(location, "r+")  # read-write on an existing store
    try:
        be.write("g/x", (0,), np.full(4, 9.0, np.float32))
        be.flush()
    finally:
        be.close()
    be = cls.open(location, "r")
    try:
        assert np.array_equal(be.read("g/x")[0], np.full(4, 9.0, np.float32))
        assert np.array_equal(be.read("g/x")[1:], data[1:])
    finally:
        be.close()


def _check_create_and_overwrite(cls, location):
    assert not cls.exists(location)
    be = cls.open(location, "w-")
    be.create_array("old", (2,), "int64", (2,), 0, cls.default_codec)
    be.set_attrs("", {"keep": 1})
    be.close()
    assert cls.exists(location)
    with pytest.raises(attnhooks.StoreExistsError) as err:
        cls.open(location, "w-")
    assert isinstance(err.value, FileExistsError)
    be = cls.open(location, "r")
    try:
        assert be.attrs("") == {"keep": 1} and be.children("") == ["old"], "the refused create left it alone"
    finally:
        be.close()

    be = cls.open(location, "w")
    be.create_array("new", (1,), "int64", (1,), 3, cls.default_codec)
    be.close()
    be = cls.open(location, "r")
    try:
        assert be.children("") == ["new"]
        assert be.attrs("") == {}
        assert np.array_equal(be.read("new"), [3])
    finally:
        be.close()


def _check_missing(cls, location):
    assert not cls.exists(location)
    for mode in ("r", "r+"):
        with pytest.raises(attnhooks.NotAStoreError):
            cls.open(location, mode)
    with pytest.raises(attnhooks.NotAStoreError):
        attnhooks.open_store(location)
    with pytest.raises(attnhooks.StoreOptionError, match="mode"):
        cls.open(location, "a")
    assert not cls.exists(location), "nothing was created on the way"


def _stored_keys(kind, location, path):
    """The engine's keys (files, objects) under ``path`` of a Zarr store; [] for the other kinds."""
    if kind not in ("zarr", "fsspec"):
        return []
    fs, root = fsspec.url_to_fs(location)
    return fs.find(f"{root}/{path}") if fs.exists(f"{root}/{path}") else []


# ================================================================================================
# Stores compared with the records of a capture (shared with the registry and integration tests)
# ================================================================================================


def _expected(rec_tensor: torch.Tensor) -> np.ndarray:
    """What a store returns for a tensor kept in float32/float16 or (widened) bfloat16."""
    t = rec_tensor.float() if rec_tensor.dtype == torch.bfloat16 else rec_tensor
    return t.numpy()


def _assert_store_equals_records(st, records):
    """Every record's q, k, attention and lse, per sample, bit for bit; calls per step; sizes."""
    assert records, "nothing was captured"
    assert sorted(st.modules) == sorted({r.module for r in records})
    by_step: dict[tuple[int, str], int] = {}
    for rec in records:
        step = rec.step
        by_step[(step, rec.module)] = max(by_step.get((step, rec.module), 0), rec.call + 1)
        batch = rec.q.shape[0]
        info = st.info(rec.module, step, rec.call)
        assert (info["batch"], info["q_len"], info["k_len"]) == (batch, rec.q.shape[2], rec.k_len)
        for s in range(batch):
            args = (rec.module, step, s, rec.call)
            for name, got in (("q", st.q(*args)), ("k", st.k(*args))):
                want = _expected(getattr(rec, name)[s])
                assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
                assert np.array_equal(got, want), (name, rec)
            if rec.attn is not None:
                got = st.attention(*args)
                assert got.dtype == np.float32 and np.array_equal(got, rec.attn[s].numpy()), ("attn", rec)
            if rec.lse is not None:
                got = st.lse(*args)
                assert got.dtype == np.float32 and np.array_equal(got, rec.lse[s].numpy()), ("lse", rec)
        with pytest.raises(attnhooks.NotInStoreError):
            st.q(rec.module, step, batch, rec.call)
    for (step, module), calls in by_step.items():
        assert st.calls(module, step) == calls


# ================================================================================================
# The suite
# ================================================================================================


class BackendConformance:
    """Every test of the backend protocol. Subclass it as ``Test<Backend>`` and set ``engine`` and
    ``backend_class`` (see the module's docstring); nothing else is needed."""

    engine: ClassVar[str]
    """The backend's kind: ``memory``, ``zarr``, ``hdf5``, ``fsspec`` (Zarr on a ``memory://`` URL)
    or a new backend's own name. The ``kind`` fixture returns it."""
    backend_class: ClassVar[type[Backend]]
    """The class under test: ``backend_class.open(location, mode)`` makes the backends."""

    def new_location(self, tmp_path) -> str:
        """A fresh, not yet existing location: the built-in kinds' own (``_location``), else a path
        under ``tmp_path`` with the backend's first suffix. Override it for a backend elsewhere."""
        if self.engine in CLASSES:
            return _location(self.engine, tmp_path)
        return str(tmp_path / f"s{self.backend_class.suffixes[0]}")

    def forget_location(self, location: str) -> None:
        """Delete what a test left at ``location`` (nothing to do under ``tmp_path``)."""
        _forget(location)

    @pytest.fixture
    def kind(self) -> str:
        return self.engine

    @pytest.fixture
    def location(self, kind, tmp_path):
        """A fresh, not yet existing location for the backend under test; memory stores are forgotten after."""
        loc = self.new_location(tmp_path)
        yield loc
        self.forget_location(loc)

    @pytest.fixture
    def backend(self, kind, location):
        """A backend freshly opened for writing at ``location``."""
        be = self.backend_class.open(location, "w-")
        yield be
        be.close()

    def test_shrink_then_grow_shows_only_fill_outside_the_kept_region(self, request, kind, backend):
        """What a shrink cut off is gone: growing again shows the fill value, not the old values."""
        data = np.arange(24, dtype=np.float32).reshape(4, 6)
        backend.create_array("x", (4, 6), "float32", (2, 4), -1.0, _codec(backend))
        backend.write("x", (), data)
        backend.resize("x", (3, 3))
        backend.resize("x", (5, 8))
        expected = np.full((5, 8), -1.0, np.float32)
        expected[:3, :3] = data[:3, :3]
        assert np.array_equal(backend.read("x"), expected)

    def test_arrays_round_trip(self, backend):
        """float32 / float16 / int64 / bool arrays (whole, partial and scalar selections, fill values,
        exact bits), string arrays, and resizing (grow: data kept, fill outside; shrink: common region kept)."""
        _check_numeric_arrays(backend)
        _check_float_bits(backend)
        _check_string_arrays(backend)
        _check_resize(backend)

    def test_children_contains_and_attrs(self, backend):
        _check_children_and_contains(backend)
        _check_attrs(backend)

    def test_open_modes(self, location):
        """A missing location (r, r+: NotAStoreError), create (w-) and its refusal over an existing
        one, overwrite (w), reopening read-only (data seen, writes refused) and read-write (r+)."""
        _check_missing(self.backend_class, location)
        _check_create_and_overwrite(self.backend_class, location)
        _check_reopen_read_only(self.backend_class, location)

    def test_remove_deletes_a_subtree_and_forgets_its_handles(self, kind, location, backend):
        """An array, then a group with children (arrays, a subgroup, attributes): gone, handles
        included; a sibling kept; missing paths ignored; an array re-created there has its new shape
        and none of the old values; the root is refused."""
        codec = _codec(backend)
        backend.create_array("g/a/x", (2, 3), "float32", (1, 3), 0.0, codec)
        backend.write("g/a/x", (), np.ones((2, 3), np.float32))
        backend.create_array("g/a/sub/y", (4,), "int64", (2,), -1, codec)
        backend.write("g/a/sub/y", (), np.arange(4))
        backend.set_attrs("g/a", {"rank": 1})
        backend.create_array("g/keep", (2,), "int64", (2,), 0, codec)
        backend.write("g/keep", (), np.array([5, 6]))
        assert backend.shape("g/a/x") == (2, 3) and backend.shape("g/a/sub/y") == (4,), "handles cached"
        assert _stored_keys(kind, location, "g/a") or kind not in ("zarr", "fsspec")

        backend.remove("g/a/sub/y")
        assert not backend.contains("g/a/sub/y") and backend.children("g/a/sub") == []
        with pytest.raises(KeyError):
            backend.shape("g/a/sub/y")
        assert np.array_equal(backend.read("g/a/x"), np.ones((2, 3), np.float32))

        backend.remove("g/a/")
        for path in ("g/a", "g/a/x", "g/a/sub"):
            assert not backend.contains(path), path
        with pytest.raises(KeyError):
            backend.read("g/a/x")
        assert backend.children("g") == ["keep"] and np.array_equal(backend.read("g/keep"), [5, 6])
        assert _stored_keys(kind, location, "g/a") == [], "the engine keeps nothing of it"

        for missing in ("g/a", "nope", "nope/deeper", "g/keep/under_an_array"):
            backend.remove(missing)
        assert backend.children("") == ["g"] and backend.children("g") == ["keep"]

        backend.create_array("g/a/x", (4, 3), "float32", (1, 3), -2.0, codec)  # same chunk grid, larger
        assert backend.shape("g/a/x") == (4, 3) and backend.attrs("g/a") == {}
        assert np.array_equal(backend.read("g/a/x"), np.full((4, 3), -2.0, np.float32)), "no old values"
        with pytest.raises(attnhooks.StoreOptionError, match="root"):
            backend.remove("")
        assert backend.children("") == ["g"]

    def test_remove_persists_and_is_refused_read_only(self, location):
        cls = self.backend_class
        be = cls.open(location, "w-")
        be.create_array("r0/x", (2,), "int64", (2,), 0, cls.default_codec)
        be.create_array("r1/x", (2,), "int64", (2,), 0, cls.default_codec)
        be.remove("r0")
        be.flush()
        be.close()
        be = cls.open(location, "r")
        try:
            assert be.children("") == ["r1"], "the removal reached the engine"
            with pytest.raises(PermissionError):
                be.remove("r1")
            assert be.children("") == ["r1"]
        finally:
            be.close()
