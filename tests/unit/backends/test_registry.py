"""The backend registry: :func:`~attnhooks.backends.backend_for` (by suffix, URL scheme and
name, the unknown-backend error, Zarr on fsspec URLs), :func:`~attnhooks.backends.register_backend`
and backends loaded through the ``attnhooks.backends`` entry-point group."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from typing import ClassVar

import pytest
import zarr

import attnhooks
from attnhooks.backends import backend_for, backend_names, register_backend
from attnhooks.backends import base as backends_base
from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from tests import models
from tests.unit.backends.conformance import ALL, BACKENDS, CLASSES, _assert_store_equals_records


@pytest.fixture(scope="module")
def llama():
    return models.llama()


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
            assert type(getattr(st.backend, "unwrapped", st.backend)) is RecordingBackend
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
