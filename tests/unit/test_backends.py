"""Storage backends and stores: one conformance suite run against every backend (memory, zarr, hdf5),
and against Zarr on an fsspec URL (``memory://.../s.zarr``, fsspec's in-process file system).

The first half drives the backend protocol directly (numpy in, numpy out); the second half
writes stores through :func:`attnhooks.capture` on small random Hugging Face models and reads
them back with :func:`attnhooks.open_store`, bit for bit against the in-memory records.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import sys
import uuid
from importlib import metadata
from typing import ClassVar

import fsspec
import h5py
import numpy as np
import pytest
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem

import attnhooks
from attnhooks.backends import Codec, backend_for, backend_names, register_backend
from attnhooks.backends import base as backends_base
from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from attnhooks.schema import module_path
from tests import models

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


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def location(kind, tmp_path):
    """A fresh, not yet existing location for the backend under test; memory stores are forgotten after."""
    loc = _location(kind, tmp_path)
    yield loc
    _forget(loc)


@pytest.fixture
def backend(kind, location):
    """A backend freshly opened for writing at ``location``."""
    be = CLASSES[kind].open(location, "w-")
    yield be
    be.close()


@pytest.fixture(scope="module")
def llama():
    return models.llama()


@pytest.fixture(scope="module")
def bert():
    return models.bert()


class FakeTokenizer:
    """The one method a capture uses from a tokenizer."""

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


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


def test_shrink_then_grow_shows_only_fill_outside_the_kept_region(request, kind, backend):
    """What a shrink cut off is gone: growing again shows the fill value, not the old values."""
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    backend.create_array("x", (4, 6), "float32", (2, 4), -1.0, _codec(backend))
    backend.write("x", (), data)
    backend.resize("x", (3, 3))
    backend.resize("x", (5, 8))
    expected = np.full((5, 8), -1.0, np.float32)
    expected[:3, :3] = data[:3, :3]
    assert np.array_equal(backend.read("x"), expected)


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


def _check_reopen_read_only(kind, location):
    cls = CLASSES[kind]
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


def _check_create_and_overwrite(kind, location):
    cls = CLASSES[kind]
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


def _check_missing(kind, location):
    cls = CLASSES[kind]
    assert not cls.exists(location)
    for mode in ("r", "r+"):
        with pytest.raises(attnhooks.NotAStoreError):
            cls.open(location, mode)
    with pytest.raises(attnhooks.NotAStoreError):
        attnhooks.open_store(location)
    with pytest.raises(attnhooks.StoreOptionError, match="mode"):
        cls.open(location, "a")
    assert not cls.exists(location), "nothing was created on the way"


def test_arrays_round_trip(backend):
    """float32 / float16 / int64 / bool arrays (whole, partial and scalar selections, fill values,
    exact bits), string arrays, and resizing (grow: data kept, fill outside; shrink: common region kept)."""
    _check_numeric_arrays(backend)
    _check_float_bits(backend)
    _check_string_arrays(backend)
    _check_resize(backend)


def test_children_contains_and_attrs(backend):
    _check_children_and_contains(backend)
    _check_attrs(backend)


def test_open_modes(kind, location):
    """A missing location (r, r+: NotAStoreError), create (w-) and its refusal over an existing
    one, overwrite (w), reopening read-only (data seen, writes refused) and read-write (r+)."""
    _check_missing(kind, location)
    _check_create_and_overwrite(kind, location)
    _check_reopen_read_only(kind, location)


def _stored_keys(kind, location, path):
    """The engine's keys (files, objects) under ``path`` of a Zarr store; [] for the other kinds."""
    if kind not in ("zarr", "fsspec"):
        return []
    fs, root = fsspec.url_to_fs(location)
    return fs.find(f"{root}/{path}") if fs.exists(f"{root}/{path}") else []


def test_remove_deletes_a_subtree_and_forgets_its_handles(kind, location, backend):
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


def test_remove_persists_and_is_refused_read_only(kind, location):
    cls = CLASSES[kind]
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


# -- registry -----------------------------------------------------------------------------------


ROUTES = {
    "run.zarr": "zarr",
    "dir/run.zarr/": "zarr",
    "RUN.ZARR": "zarr",
    "run.h5": "hdf5",
    "run.H5": "hdf5",
    "a/b/run.hdf5": "hdf5",
    "file:///tmp/run.h5": "hdf5",
    "file:///tmp/run.zarr": "zarr",
    "memory://run": "memory",
    "memory://run.h5": "memory",  # the scheme wins over the suffix
    "memory://run.zarr": "zarr",  # ... except .zarr: Zarr on fsspec's memory file system
    "s3://bucket/run.zarr": "zarr",
    "gs://bucket/dir/RUN.ZARR/": "zarr",
    "MEMORY://x": "memory",
    "zarr://some/where": "zarr",
    "hdf5://some/where": "hdf5",
}


def test_backend_for_picks_by_suffix_scheme_and_name(tmp_path):
    for location, name in ROUTES.items():
        assert backend_for(location) is CLASSES[name], location
    assert backend_for(tmp_path / "x.zarr") is ZarrBackend, "path objects too"
    assert backend_for(tmp_path / "x.hdf5") is HDF5Backend
    assert backend_for("whatever.bin", backend="zarr") is ZarrBackend, "an explicit name wins"
    assert backend_for("run.zarr", backend="hdf5") is HDF5Backend
    assert backend_for("x", backend="memory") is MemoryBackend
    noext = tmp_path / "noext"
    zarr.open_group(str(noext), mode="w", zarr_format=3)
    assert backend_for(noext) is ZarrBackend, "an existing zarr directory without suffix"
    assert set(BACKENDS) <= set(backend_names())


def test_backend_for_unknown_raises_listing_the_known_backends():
    for location in ("run.txt", "run", "s3://bucket/run.txt", "nope://x"):
        with pytest.raises(attnhooks.StoreOptionError) as err:
            backend_for(location)
        assert isinstance(err.value, ValueError)
        for name in BACKENDS:
            assert name in str(err.value), (location, str(err.value))
    with pytest.raises(attnhooks.StoreOptionError, match="nosuchbackend"):
        backend_for("run.zarr", backend="nosuchbackend")
    with pytest.raises(attnhooks.StoreOptionError):
        attnhooks.open_store("run.zarr", backend="nosuchbackend")
    with pytest.raises(attnhooks.StoreOptionError):
        attnhooks.open_store("run.txt")


def test_zarr_urls_go_to_zarr_on_fsspec_whatever_the_scheme():
    assert backend_for("memory://a.zarr") is ZarrBackend
    assert backend_for("s3://b/r.zarr") is ZarrBackend
    assert backend_for("memory://a") is MemoryBackend, "a plain memory:// name stays in-process"
    assert backend_for("s3://b/r", backend="zarr") is ZarrBackend, "backend='zarr' takes any URL"
    with pytest.raises(attnhooks.StoreOptionError, match=r"ending in \.zarr"):
        backend_for("s3://b/r.txt")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed: it would go online")
def test_zarr_url_without_its_fsspec_driver_names_what_to_install(monkeypatch):
    with pytest.raises(attnhooks.StoreOptionError, match="s3fs") as err:
        attnhooks.open_store("s3://bucket/run.zarr")
    assert "s3://bucket/run.zarr" in str(err.value)
    with pytest.raises(attnhooks.StoreOptionError, match="protocol 'nope'"):
        ZarrBackend.open("nope://x.zarr", "w-")
    monkeypatch.setitem(sys.modules, "fsspec.core", None)  # as if fsspec were not installed
    with pytest.raises(attnhooks.StoreOptionError, match="pip install fsspec"):
        ZarrBackend.exists("memory://a.zarr")
    assert ZarrBackend.exists("file:///no/such/dir.zarr") is False, "local stores do not need fsspec"


def test_register_backend_refuses_what_is_not_a_backend():
    class NotABackend:
        name = "broken"

    with pytest.raises(attnhooks.StoreOptionError, match="schemes"):
        register_backend(NotABackend)  # type: ignore[arg-type]


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(backends_base, "_REGISTRY", dict(backends_base._REGISTRY))


class RecordingBackend(MemoryBackend):
    """A third-party backend: the memory one under its own name and scheme, counting opens."""

    name = "recording"
    schemes = ("myscheme",)
    suffixes = (".mine",)
    opened: ClassVar[list[tuple[str, str]]] = []

    @classmethod
    def open(cls, location, mode):
        cls.opened.append((location, mode))
        return super().open(location, mode)


def test_register_backend_custom_scheme_end_to_end(private_registry, llama):
    location = "myscheme://x"
    RecordingBackend.opened = []
    assert register_backend(RecordingBackend) is RecordingBackend
    assert "recording" in backend_names()
    assert backend_for(location) is RecordingBackend
    assert backend_for("run.mine") is RecordingBackend
    assert backend_for("y", backend="recording") is RecordingBackend
    x, _ = models.ids(2, 6)
    try:
        with attnhooks.capture(llama, store=location, keep=True, record=ALL) as cap:
            llama(input_ids=x)
            llama(input_ids=x[:1, :4])
        with attnhooks.open_store(location) as st:
            assert type(st.backend) is RecordingBackend
            assert st.status == "complete" and st.steps == [0, 1]
            _assert_store_equals_records(st, cap.records)
        assert RecordingBackend.opened == [(location, "w-"), (location, "r")]
    finally:
        RecordingBackend.delete(location)


class EntryPointBackend(MemoryBackend):
    """Loaded through the ``attnhooks.backends`` entry-point group."""

    name = "epbackend"
    schemes = ("epscheme",)
    suffixes = ()


def test_entry_point_backend_is_found(private_registry, monkeypatch):
    ep = metadata.EntryPoint(
        name="epbackend", value=f"{__name__}:EntryPointBackend", group=backends_base.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(backends_base, "_entry_points", lambda: [ep])
    assert "epbackend" in backend_names()
    assert backend_for("epscheme://z").__name__ == "EntryPointBackend"
    assert backend_for("z", backend="epbackend").__name__ == "EntryPointBackend"


# ================================================================================================
# Stores written by capture()
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


def _run(model, batches, **kwargs):
    """One capture: one forward (one step) per ``(batch, length)``; returns the capture."""
    with attnhooks.capture(model, **kwargs) as cap:
        for batch, length in batches:
            x, mask = models.ids(batch, length)
            model(input_ids=x, attention_mask=mask)
    return cap


def test_store_equals_records_bit_for_bit(location, llama):
    """Three steps (one with a padded sample) read back equal to the records, and to a capture
    without a store of the same forwards."""
    inputs = [models.ids(2, 7, pad_last=3), models.ids(1, 5), models.ids(3, 4)]

    def forwards():
        for x, mask in inputs:
            llama(input_ids=x, attention_mask=mask)

    with attnhooks.capture(llama, store=location, keep=True, record=ALL, compression="none") as cap:
        forwards()
    with attnhooks.capture(llama, record=ALL) as plain:
        forwards()
    assert len(cap.records) == 3 * 2
    with attnhooks.open_store(location) as st:
        assert st.backend.readonly, "open_store reads by default"
        assert st.steps == [0, 1, 2] and st.committed == 3
        assert st.modules == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert st.dropped == 0 and st.dropped_steps == []
        _assert_store_equals_records(st, cap.records)
    for a, b in zip(cap.records, plain.records, strict=True):  # a store does not change what is captured
        assert (a.module, a.step, a.call) == (b.module, b.step, b.call)
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in ALL), a
    with attnhooks.open_store(location) as st:
        mask = st.mask(st.modules[0], 0, 1)
        assert mask["causal"] and mask["dense"] is None and mask["window"] is None
        assert np.array_equal(mask["key_valid"], inputs[0][1][1].bool().numpy())
    with pytest.raises(attnhooks.NotAStoreError, match="mode"):
        attnhooks.open_store(location, mode="w")
    with attnhooks.open_store(location, mode="r+") as st:
        assert st.steps == [0, 1, 2] and not st.backend.readonly


def test_append_continues_step_ids_and_keeps_both_captures(location, llama):
    first = _run(llama, [(2, 6), (1, 4), (2, 3)], store=location, keep=True, record=ALL)
    second = _run(llama, [(3, 5), (1, 8)], store=location, keep=True, record=ALL, mode="append")
    assert sorted({r.step for r in second.records}) == [3, 4], "step ids continue after the committed ones"
    with attnhooks.open_store(location) as st:
        assert st.steps == [0, 1, 2, 3, 4] and st.committed == 5 and st.status == "complete"
        _assert_store_equals_records(st, first.records + second.records)


def test_variable_lengths_read_back_at_their_true_shapes(location, llama):
    """Steps of different batch sizes and lengths (longest first) read back at their own shapes,
    token ids and strings (through a tokenizer) included."""
    shapes = [(2, 9), (1, 4), (3, 6), (1, 1)]
    inputs = [models.ids(b, n, vocab=120)[0] + step for step, (b, n) in enumerate(shapes)]
    with attnhooks.capture(
        llama, store=location, keep=True, record=ALL, compression="gzip", tokenizer=FakeTokenizer()
    ) as cap:
        for x in inputs:
            llama(input_ids=x)
    module = "model.layers.1.self_attn"
    with attnhooks.open_store(location) as st:
        q_path = module_path(module, "q")
        assert st.backend.shape(q_path)[0] >= 4 and st.backend.shape(q_path)[2:] == (3, 4, 9, 16), "padded storage"
        for step, (batch, length) in enumerate(shapes):
            info = st.info(module, step)
            assert (info["batch"], info["q_len"], info["k_len"], info["k_stored"]) == (batch, length, length, length)
            for s in range(batch):
                assert st.q(module, step, s).shape == (4, length, 16)
                assert st.k(module, step, s).shape == (2, length, 16)
                assert st.attention(module, step, s).shape == (4, length, length)
                assert st.lse(module, step, s).shape == (4, length)
                ids = inputs[step][s].tolist()
                assert st.tokens(step, s) == (ids, [f"<{i}>" for i in ids])
            with pytest.raises(attnhooks.NotInStoreError, match="batch size"):
                st.attention(module, step, batch)
        _assert_store_equals_records(st, cap.records)


def test_metadata_and_token_ids(location, llama):
    inputs = [models.ids(1, 4)[0], models.ids(2, 3)[0]]
    with attnhooks.capture(llama, store=location, record=("q", "k", "lse"), buffer="64MiB") as cap:
        for x in inputs:
            llama(input_ids=x)
    assert cap.records == [], "keep defaults to False with a store"
    with attnhooks.open_store(location) as st:
        meta = st.metadata
        assert meta["schema"] == "attnhooks/1" and st.schema == "attnhooks/1"
        assert meta["status"] == "complete" == st.status
        assert meta["committed"] == 2 and meta["dropped"] == 0
        assert meta["model"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
        assert meta["created"] and meta["closed"] and meta["created"] <= meta["closed"]
        options = json.loads(meta["options"])
        assert options["record"] == ["k", "lse", "q"]
        assert options["mode"] == "create" and options["buffer"] == "64MiB" and options["dtype"] is None
        versions = meta["versions"]
        assert versions["attnhooks"] == attnhooks.__version__ and versions["torch"] == torch.__version__
        assert versions["numpy"] == np.__version__
        engine = {"zarr": ("zarr", zarr.__version__), "hdf5": ("h5py", h5py.__version__)}
        kind = type(st.backend).name
        if kind in engine:
            assert versions[engine[kind][0]] == engine[kind][1]
        for layer, module in enumerate(st.modules):
            info = st.module_info(module)
            assert info["name"] == module and info["layer"] == layer
            assert (info["heads"], info["kv_heads"], info["head_dim"]) == (4, 2, 16)
            assert info["kind"] == "self" and info["causal"] is True
            assert info["scale"] == 0.25 and info["dtype"] == "float32" and info["bits"] is False
        for step, x in enumerate(inputs):
            for s in range(x.shape[0]):
                assert st.tokens(step, s) == (x[s].tolist(), None)
        with pytest.raises(attnhooks.NotInStoreError, match="attn"):
            st.attention(st.modules[0], 0, method="stored")
        with pytest.raises(attnhooks.NotInStoreError):
            st.module_info("model.layers.7.self_attn")
        with pytest.raises(attnhooks.NotInStoreError):
            st.q(st.modules[0], step=99)


@pytest.fixture(scope="module")
def llama_bf16(llama):
    return copy.deepcopy(llama).to(torch.bfloat16)


def test_storage_dtypes(location, llama, llama_bf16):
    """bfloat16 stored as float32 (default) or as raw bits: both read back exactly; float16 on request.
    Each capture overwrites the store of the one before."""
    for model, dtype, stored, raw in [
        (llama_bf16, None, "float32", "float32"),
        (llama_bf16, "bfloat16-bits", "bfloat16", "uint16"),
        (llama, "float16", "float16", "float16"),
    ]:
        cap = _run(model, [(2, 5)], store=location, keep=True, record=ALL, dtype=dtype, mode="overwrite")
        assert cap.records[0].q.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)
        with attnhooks.open_store(location) as st:
            assert st.steps == [0]
            for module in st.modules:
                info = st.module_info(module)
                assert info["dtype"] == stored, dtype
                assert info["bits"] is (dtype == "bfloat16-bits")
                assert st.backend.dtype(module_path(module, "q")) == raw
                assert st.backend.dtype(module_path(module, "k")) == raw
                assert st.backend.dtype(module_path(module, "attn")) == ("float16" if dtype == "float16" else "float32")
                assert st.backend.dtype(module_path(module, "lse")) == "float32"
            for rec in cap.records:
                for s in range(rec.q.shape[0]):
                    args = (rec.module, rec.step, s)
                    q, k, attn, lse = st.q(*args), st.k(*args), st.attention(*args), st.lse(*args)
                    assert attn.dtype == lse.dtype == np.float32
                    assert np.array_equal(lse, rec.lse[s].numpy())
                    if dtype == "float16":
                        assert q.dtype == k.dtype == np.float16
                        assert np.array_equal(q, rec.q[s].half().numpy())
                        assert np.array_equal(k, rec.k[s].half().numpy())
                        assert np.array_equal(attn, rec.attn[s].half().float().numpy())
                    else:
                        assert q.dtype == k.dtype == np.float32
                        assert np.array_equal(q, rec.q[s].float().numpy())
                        assert np.array_equal(k, rec.k[s].float().numpy())
                        assert np.array_equal(attn, rec.attn[s].numpy())


# -- errors ---------------------------------------------------------------------------------------


def test_refusals_leave_the_store_and_the_model_alone(location, llama, bert):
    """append to nothing, create over a store, append other modules: each refused with its error,
    no hook left behind (the conftest guard checks that), the store as it was."""
    x, mask = models.ids(1, 5)
    with pytest.raises(attnhooks.NotAStoreError):
        with attnhooks.capture(llama, store=location, mode="append"):
            llama(input_ids=x)
    first = _run(llama, [(1, 4)], store=location, keep=True, record=ALL)
    with pytest.raises(attnhooks.StoreExistsError, match="overwrite"):
        with attnhooks.capture(llama, store=location):
            llama(input_ids=x)  # never runs: the store is refused on entry
    with pytest.raises(attnhooks.StoreMismatchError, match=r"encoder\.layer\.0"):
        with attnhooks.capture(bert, store=location, mode="append"):
            bert(input_ids=x, attention_mask=mask)
    with attnhooks.open_store(location) as st:
        assert st.steps == [0]
        assert st.modules == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        _assert_store_equals_records(st, first.records)


def test_append_with_other_head_counts_raises_mismatch(tmp_path, llama):
    location = _location("memory", tmp_path)  # the check is the writer's: one backend is enough
    try:
        _run(llama, [(1, 4)], store=location)
        wider = models.llama(heads=8, kv_heads=2)
        x, _ = models.ids(1, 5)
        with pytest.raises(attnhooks.StoreMismatchError, match="heads"):
            with attnhooks.capture(wider, store=location, mode="append"):
                wider(input_ids=x)
    finally:
        MemoryBackend.delete(location)


def test_refused_append_leaves_the_store_appendable(tmp_path, llama, bert):
    location = _location("memory", tmp_path)  # the writer's behaviour: one backend is enough
    try:
        _run(llama, [(1, 4)], store=location)
        x, mask = models.ids(1, 5)
        with pytest.raises(attnhooks.StoreMismatchError):
            with attnhooks.capture(bert, store=location, mode="append"):
                bert(input_ids=x, attention_mask=mask)
        with attnhooks.open_store(location) as st:
            assert st.status == "complete"
        cap = _run(llama, [(1, 3)], store=location, keep=True, mode="append")
        assert {r.step for r in cap.records} == {1}
    finally:
        MemoryBackend.delete(location)


class ListInput(torch.nn.Module):
    """A model whose first argument is a list of differently sized inputs (as torchvision's
    detection models take images): nothing in it is token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, items):
        return [self.attn(x, x, x)[0] for x in items]


def test_a_list_argument_that_is_not_token_ids_is_not_stored_as_tokens(tmp_path):
    location = _location("memory", tmp_path)  # the capture's behaviour: one backend is enough
    model = ListInput().eval()
    items = [torch.randn(1, 3, 8), torch.randn(1, 5, 8)]
    try:
        with attnhooks.capture(model, store=location, keep=True) as cap:
            model(items)
        with attnhooks.open_store(location) as st:
            assert st.tokens(0) == ([], None)
            assert st.calls("attn", 0) == 2
            _assert_store_equals_records(st, [r for r in cap.records if r.q is not None])
    finally:
        MemoryBackend.delete(location)


def _not_a_store(kind, tmp_path, what):
    """Make something that is not an attnhooks store at a location of ``kind``; return it."""
    if kind == "memory":
        loc = _location(kind, tmp_path)
        be = MemoryBackend.open(loc, "w")
        be.create_group("modules")
        if what == "future":
            be.set_attrs("", {"schema": "attnhooks/99", "status": "complete", "committed": 0})
        return loc
    if kind in ("zarr", "fsspec"):  # a local path or a memory:// URL: fsspec and zarr take both
        loc = str(tmp_path / "x.zarr") if kind == "zarr" else _location(kind, tmp_path)
        fs, path = fsspec.url_to_fs(loc)
        if what == "text":
            fs.pipe_file(path, b"hello, I am not a store\n")
        elif what == "empty":
            fs.mkdir(path)
        elif what == "array":
            zarr.create_array(loc, shape=(2,), dtype="int64", zarr_format=3)
        else:
            group = zarr.open_group(loc, mode="w", zarr_format=3)
            group.create_group("modules")
            if what == "future":
                group.attrs.update({"schema": "attnhooks/99", "status": "complete", "committed": 0})
        return loc
    path = tmp_path / "x.h5"
    if what == "text":
        path.write_text("hello, I am not a store\n")
    elif what == "empty":
        path.write_bytes(b"")
    else:
        with h5py.File(path, "w") as f:
            f.create_group("modules")
            if what == "array":
                f.create_dataset("data", data=np.arange(3))
            if what == "future":
                f.attrs["schema"] = "attnhooks/99"
                f.attrs["status"] = "complete"
    return str(path)


NOT_STORES = {
    "memory": ["plain"],
    "zarr": ["text", "empty", "array", "plain"],
    "fsspec": ["text", "empty", "array", "plain"],
    "hdf5": ["text", "empty", "array", "plain"],
}


def test_opening_what_is_not_a_store_raises(kind, tmp_path, llama):
    """A text file, an empty file or directory, an engine file or group with no schema attribute,
    and a store of a future schema: all NotAStoreError (also for repair), never a crash."""
    for what in NOT_STORES[kind]:
        sub = tmp_path / what
        sub.mkdir()
        loc = _not_a_store(kind, sub, what)
        try:
            with pytest.raises(attnhooks.NotAStoreError) as err:
                attnhooks.open_store(loc)
            assert isinstance(err.value, ValueError) and loc in str(err.value), (what, str(err.value))
            with pytest.raises(attnhooks.NotAStoreError):
                attnhooks.repair(loc)
        finally:
            _forget(loc)
    loc = _not_a_store(kind, tmp_path, "future")
    try:
        with pytest.raises(attnhooks.NotAStoreError, match="attnhooks/99"):
            attnhooks.open_store(loc)
        x, _ = models.ids(1, 4)
        with pytest.raises(attnhooks.StoreMismatchError, match="attnhooks/99"):
            with attnhooks.capture(llama, store=loc, mode="append"):
                llama(input_ids=x)
    finally:
        _forget(loc)


def test_opening_a_store_never_unpickles(location, llama, monkeypatch):
    x, mask = models.ids(2, 6, pad_last=2)
    with attnhooks.capture(llama, store=location, keep=True, record=ALL, tokenizer=FakeTokenizer()) as cap:
        llama(input_ids=x, attention_mask=mask)
        llama(input_ids=x[:1, :3])

    unpickled = []

    def refuse(*args, **kwargs):
        unpickled.append(args)
        raise AssertionError("a store read unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    with attnhooks.open_store(location) as st:
        assert st.metadata["schema"] == "attnhooks/1" and st.status == "complete"
        assert st.steps == [0, 1] and st.dropped_steps == []
        for module in st.modules:
            assert st.module_info(module)["name"] == module
            for step in st.steps:
                for call in range(st.calls(module, step)):
                    info = st.info(module, step, call)
                    for s in range(info["batch"]):
                        args = (module, step, s, call)
                        st.q(*args), st.k(*args), st.lse(*args), st.attention(*args), st.mask(*args)
        for step in st.steps:
            assert st.tokens(step, 0)[1] is not None
        _assert_store_equals_records(st, cap.records)
        repr(st)
    assert unpickled == []


# ================================================================================================
# Zarr on fsspec URLs
# ================================================================================================


def test_a_new_url_store_appears_with_its_root_attributes_in_one_put(tmp_path, monkeypatch):
    """No rename on an object store: the root zarr.json is put once, attributes included ("w-"
    and "w" over an existing store, whose old content is gone)."""
    location = _location("fsspec", tmp_path)
    root = "/" + location.removeprefix("memory://") + "/zarr.json"
    puts = []
    original = MemoryFileSystem.pipe_file

    def spy(self, path, value, *args, **kwargs):
        puts.append((path, bytes(value)))
        return original(self, path, value, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", spy)
    try:
        for mode in ("w-", "w"):
            puts.clear()
            be = ZarrBackend.open(location, mode, {"schema": "attnhooks/1", "mode": mode})
            assert [path for path, _ in puts] == [root], mode
            assert json.loads(puts[0][1])["attributes"] == {"schema": "attnhooks/1", "mode": mode}
            assert be.children("") == [], "nothing of the overwritten store is left"
            be.create_array("old/x", (1,), "int64", (1,), 0, ZarrBackend.default_codec)
            be.close()
        assert ZarrBackend.cleanup(location) == []
    finally:
        _forget(location)


def test_a_url_store_written_by_one_instance_reads_through_another(tmp_path, llama):
    location = _location("fsspec", tmp_path)
    try:
        writer = ZarrBackend.open(location, "w-")
        with attnhooks.capture(llama, store=writer, keep=True, record=ALL) as cap:
            for batch, length in [(2, 5), (1, 3)]:
                x, mask = models.ids(batch, length)
                llama(input_ids=x, attention_mask=mask)
        fs, path = fsspec.url_to_fs(location)  # fsspec's own view of the objects
        root = json.loads(fs.cat_file(f"{path}/zarr.json"))["attributes"]
        assert (root["schema"], root["status"], root["committed"]) == ("attnhooks/1", "complete", 2)
        with attnhooks.open_store(location) as st:
            assert type(st.backend) is ZarrBackend and st.backend is not writer
            assert st.steps == [0, 1]
            _assert_store_equals_records(st, cap.records)
    finally:
        _forget(location)
