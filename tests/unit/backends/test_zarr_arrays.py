"""Arrays of a local Zarr store made without zarr's event loop (:mod:`attnhooks.backends.zarrarrays`): the
same ``zarr.json`` as zarr's own, checked against zarr's first array of each kind, and zarr makes every
array when they differ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from attnhooks.backends import zarrarrays
from attnhooks.backends.base import Codec
from attnhooks.backends.zarrstore import ZarrBackend

KINDS = [
    ("float32", float("nan"), Codec("zstd", 1)),
    ("float16", 0.0, Codec("gzip", 3)),
    ("int64", -1, Codec("none", 0, checksum=False)),
    ("int64", -1, Codec("none", 0)),
    ("bool", False, Codec("none", 0, skip_empty=False)),
    ("str", "", Codec("zstd", 1)),
]


@pytest.fixture
def checks(monkeypatch):
    """A process that has checked nothing yet."""
    fresh = zarrarrays.Checks()
    monkeypatch.setattr(zarrarrays, "CHECKS", fresh)
    return fresh


@pytest.fixture
def made_here(monkeypatch):
    """The paths create_local made."""
    paths: list[str] = []
    real = zarrarrays.create_local

    def counting(root, place, path, *rest):
        paths.append(path)
        return real(root, place, path, *rest)

    monkeypatch.setattr(zarrarrays, "create_local", counting)
    return paths


def _meta(store, path):
    return (store / path / "zarr.json").read_bytes()


@pytest.mark.parametrize(("dtype", "fill", "codec"), KINDS, ids=lambda k: str(k))
def test_an_array_made_here_is_the_one_zarr_makes(tmp_path, checks, made_here, dtype, fill, codec):
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    be.create_array("modules/a/first", (4, 3, 5), dtype, (1, 3, 5), fill, codec)  # by zarr: the check
    assert made_here == [] and len(checks.verified) == 1 and checks.failed is None
    be.create_array("stacks/second", (6, 2, 5), dtype, (1, 2, 4), fill, codec)  # here (a new parent too)
    assert made_here == ["stacks/second"]

    reference = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=3)
    reference.create_array(
        "second", shape=(6, 2, 5), chunks=(1, 2, 4), overwrite=True, **zarrarrays.keywords(dtype, fill, codec)
    )
    assert _meta(tmp_path / "s.zarr", "stacks/second") == _meta(tmp_path / "z.zarr", "second")
    assert json.loads(_meta(tmp_path / "s.zarr", "stacks"))["node_type"] == "group"

    values = np.arange(60).reshape(6, 2, 5).astype(str if dtype == "str" else dtype)
    be.write("stacks/second", (slice(0, 4),), values[:4])  # whole chunks (straight to files) and a part
    be.write("stacks/second", (4, slice(None), slice(0, 3)), values[4, :, :3])
    be.close()
    stored = zarr.open_array(str(tmp_path / "s.zarr" / "stacks" / "second"), mode="r")[...]
    expected = np.full((6, 2, 5), "" if dtype == "str" else fill, dtype=stored.dtype)
    expected[:4], expected[4, :, :3] = values[:4], values[4, :, :3]
    assert np.array_equal(stored, expected, equal_nan=stored.dtype.kind == "f")
    again = ZarrBackend.open(str(tmp_path / "s.zarr"), "r")
    assert np.array_equal(again.read("stacks/second"), stored, equal_nan=stored.dtype.kind == "f")
    assert again.checksummed("stacks/second") == codec.checksum


def test_an_array_made_over_another_replaces_it_whole(tmp_path, checks, made_here):
    """As zarr's ``overwrite=True``: nothing of what was at the path is left (chunks read as the fill)."""
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    codec = Codec("none", 0)
    be.create_array("t/a", (4,), "int64", (2,), -1, codec)
    be.create_array("t/b", (4,), "int64", (2,), -1, codec)
    be.write("t/b", (slice(0, 4),), np.arange(4))
    be.create_group("t/c/deeper")
    be.create_array("t/b", (4,), "int64", (2,), -1, codec)
    be.create_array("t/c", (4,), "int64", (2,), -1, codec)
    assert made_here == ["t/b", "t/b", "t/c"]
    assert be.read("t/b").tolist() == [-1] * 4
    assert not (tmp_path / "s.zarr" / "t" / "c" / "deeper").exists()
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "t" / "b").iterdir()) == ["zarr.json"]


def test_zarr_makes_every_array_when_its_metadata_differs(tmp_path, checks, made_here, monkeypatch):
    """A zarr whose ``zarr.json`` is not the one made here (a changed private function): one warning, and
    every array of the process is made by zarr, readable as before."""
    monkeypatch.setattr(zarrarrays, "document", lambda metadata: b"{}")
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    codec = Codec("none", 0)
    with pytest.warns(RuntimeWarning, match="every array is created through zarr"):
        be.create_array("t/a", (4,), "int64", (2,), -1, codec)
    assert checks.failed is not None and "zarr wrote" in checks.failed and not checks.verified
    be.create_array("t/b", (4,), "int64", (2,), -1, codec)  # no second warning (an error under -W error)
    be.write("t/b", (slice(0, 4),), np.arange(4))
    assert made_here == [] and be.read("t/b").tolist() == [0, 1, 2, 3]


def test_a_missing_metadata_function_leaves_arrays_to_zarr(tmp_path, checks, made_here, monkeypatch):
    """A zarr without the private functions used here (renamed: the import fails) makes every array."""

    def renamed(*args):
        raise ImportError("cannot import name '_parse_chunk_encoding_v3' from 'zarr.core.array'")

    monkeypatch.setattr(zarrarrays, "_encoding", renamed)
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    with pytest.warns(RuntimeWarning, match="ImportError"):
        be.create_array("t/a", (4,), "int64", (2,), -1, Codec("none", 0))
    be.create_array("t/b", (4,), "int64", (2,), -1, Codec("none", 0))
    assert made_here == [] and be.shape("t/b") == (4,)
