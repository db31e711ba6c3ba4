"""The backend conformance suite (:class:`~tests.unit.backends.conformance.BackendConformance`)
run against every built-in backend: memory, zarr, hdf5, and Zarr on an fsspec URL
(``memory://.../s.zarr``, fsspec's in-process file system). A test of one backend alone is a
method of that backend's subclass."""

from __future__ import annotations

import json

from fsspec.implementations.memory import MemoryFileSystem

from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from tests.unit.backends.conformance import BackendConformance, _forget, _location


class TestMemory(BackendConformance):
    engine = "memory"
    backend_class = MemoryBackend


class TestZarr(BackendConformance):
    engine = "zarr"
    backend_class = ZarrBackend


class TestHDF5(BackendConformance):
    engine = "hdf5"
    backend_class = HDF5Backend


class TestZarrOnFsspec(BackendConformance):
    """The zarr backend on a ``memory://`` URL, through zarr's FsspecStore."""

    engine = "fsspec"
    backend_class = ZarrBackend

    def test_a_new_url_store_appears_with_its_root_attributes_in_one_put(self, tmp_path, monkeypatch):
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
