"""HDF5 attributes written through h5py's low-level API are the attributes h5py itself would write."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.hdf5attrs import decode, encode, write_attrs

VALUES = {
    "name": "model.layers.0.self_attn",
    "unicode": "Zürich ✓",
    "empty": "",
    "heads": 4,
    "big": 2**62,
    "scale": 0.125,
    "causal": True,
    "bits": False,
    "numpy_int": np.int32(7),
    "numpy_float": np.float32(0.5),
    "columns": ["batch", "q_len"],
    "nested": {"a": [1, 2], "b": None},
    "none": None,
    "json_looking": "{not json",
}


def _by_h5py(path, values):
    with h5py.File(path, "w") as f:
        g = f.create_group("g")
        for key, value in values.items():
            g.attrs[key] = encode(value)


def _by_write_attrs(path, values):
    with h5py.File(path, "w", libver="latest") as f:
        write_attrs(f.create_group("g"), values)


def _stored(path):
    with h5py.File(path, "r") as f:
        attrs = f["g"].attrs
        return {key: (attrs[key], attrs.get_id(key).dtype, attrs.get_id(key).shape) for key in attrs}


def test_new_attributes_have_h5pys_types_and_values(tmp_path):
    _by_h5py(tmp_path / "a.h5", VALUES)
    _by_write_attrs(tmp_path / "b.h5", VALUES)
    ours, theirs = _stored(tmp_path / "b.h5"), _stored(tmp_path / "a.h5")
    assert ours.keys() == theirs.keys() == VALUES.keys()
    for key, (value, dtype, shape) in theirs.items():
        got, got_dtype, got_shape = ours[key]
        assert (got_dtype, got_shape) == (dtype, shape), key
        assert h5py.check_string_dtype(got_dtype) == h5py.check_string_dtype(dtype), key
        assert type(got) is type(value) and got == value, key
        assert decode(got) == decode(value), key
    assert decode(ours["nested"][0]) == {"a": [1, 2], "b": None}
    assert decode(ours["unicode"][0]) == "Zürich ✓"


def test_an_attribute_is_rewritten_in_place_or_replaced_when_its_type_changes(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w", libver="latest") as f:
        g = f.create_group("g")
        write_attrs(g, {"committed": 1, "status": "writing", "steps": [1], "flag": True, "on": True, "x": 0.5})
        write_attrs(g, {"committed": 2, "status": "complete, and longer", "steps": {"x": 1}, "flag": "now a string"})
        write_attrs(g, {"committed": "three", "on": False, "x": 1.5})
    with h5py.File(path, "r") as f:
        attrs = {key: decode(value) for key, value in f["g"].attrs.items()}
        assert f["g"].attrs.get_id("on").dtype == bool
    want = {"committed": "three", "status": "complete, and longer", "steps": {"x": 1}, "flag": "now a string"}
    assert attrs == {**want, "on": False, "x": 1.5}


def test_module_groups_keep_their_attributes_in_the_object_header(tmp_path):
    """A new group's attributes stay compact (no fractal heap to tear) up to 32 of them."""
    path = str(tmp_path / "d.h5")
    backend = HDF5Backend.open(path, "w", {"schema": "x"})
    backend.create_group("modules/a/b")  # parents made as h5py makes them
    backend.set_attrs("modules/a/b", {f"k{i}": i for i in range(20)})
    backend.close()
    with h5py.File(path, "r") as f:
        gcpl = f["modules/a/b"].id.get_create_plist()
        assert gcpl.get_attr_phase_change() == (32, 24)
        info = h5py.h5o.get_info(f["modules/a/b"].id)
        assert info.num_attrs == 20
        assert info.hdr.nmesgs > 20, "each attribute a message of the object header (dense storage: ~4 in all)"
        assert dict(f["modules/a/b"].attrs)["k19"] == 19
        assert isinstance(f["modules/a"], h5py.Group)


@pytest.mark.parametrize("value", [np.arange(3), [[1, 2], [3]]])
def test_values_that_are_not_scalars_are_json_text(tmp_path, value):
    path = tmp_path / "e.h5"
    _by_write_attrs(path, {"v": value.tolist() if isinstance(value, np.ndarray) else value})
    with h5py.File(path, "r") as f:
        stored = f["g"].attrs["v"]
    assert isinstance(stored, str)
    assert decode(stored) == (value.tolist() if isinstance(value, np.ndarray) else value)
