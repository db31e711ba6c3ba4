"""HDF5 attributes: their encoding, and writing them through h5py's low-level API.

``node.attrs[key] = value`` creates each attribute under a temporary name, writes it, deletes the
old one and renames the new one (five HDF5 calls, 50-100 µs each attribute with the GIL held; a new
module's ~15 attributes took ~3 ms of the writer thread). :func:`write_attrs` makes a new attribute
with one create and one write, and writes an existing one of the same type and shape in place (the
per-commit root attributes: a count rewritten in place, the smallest change HDF5 can make to a file);
anything else goes through h5py's own path. The attributes are the same as h5py's: the type h5py
would pick for the value (a ``str`` is a variable-length UTF-8 string), read back the same way.

Attribute values that are not scalars or plain strings are stored as JSON text.
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

__all__ = ["decode", "encode", "write_attrs"]

_JSON_START = ("{", "[", '"')
_STR = h5py.string_dtype()
_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)


def _types(dtype: np.dtype[Any]) -> tuple[h5py.h5t.TypeID, h5py.h5t.TypeID]:
    """The HDF5 types of an attribute of ``dtype``: in the file (h5py's logical one) and in memory."""
    return h5py.h5t.py_create(dtype, logical=True), h5py.h5t.py_create(dtype)


# the types of the values attributes hold, made once (h5t.py_create costs ~20K instructions a call:
# made per attribute, a tenth of a writer thread's work in a 32-layer generate)
_TYPES = {dtype.char: _types(dtype) for dtype in (np.dtype("int64"), np.dtype("float64"), np.dtype(bool), _STR)}


def write_attrs(node: h5py.Group | h5py.Dataset, values: dict[str, Any]) -> None:
    """Set ``values`` (encoded by :func:`encode`) as attributes of ``node``."""
    oid = node.id
    for key, value in values.items():
        encoded = encode(value)
        data = np.asarray(encoded, dtype=_STR if isinstance(encoded, str) else None)
        if data.dtype.kind not in "biuf" and data.dtype != _STR:  # not a plain scalar: h5py decides
            node.attrs[key] = encoded
            continue
        name = key.encode()
        exists = h5py.h5a.exists(oid, name)
        if exists:
            attr = h5py.h5a.open(oid, name)
            if not _same(attr.dtype, data.dtype) or attr.shape != ():
                node.attrs[key] = encoded  # another type: h5py's replace
                continue
        types = _TYPES.get(data.dtype.char) or _types(data.dtype)
        if not exists:
            attr = h5py.h5a.create(oid, name, types[0], _SCALAR)
        attr.write(data, mtype=types[1])


def _same(stored: np.dtype[Any], new: np.dtype[Any]) -> bool:
    """True when a value of dtype ``new`` may be written into an attribute of dtype ``stored``."""
    if new.kind == "O":  # (object dtypes compare equal whatever string type they stand for)
        return stored.kind == "O" and h5py.check_string_dtype(stored) == h5py.check_string_dtype(new)
    return stored == new


def encode(value: Any) -> Any:
    """A value as stored: scalars and plain strings as they are, anything else as JSON text."""
    if isinstance(value, bool | int | float | np.integer | np.floating):
        return value
    if isinstance(value, str) and not value.startswith(_JSON_START) and value != "null":
        return value
    return json.dumps(value)


def decode(value: Any) -> Any:
    """A stored attribute's value as written (:func:`encode` undone)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return json.loads(value) if value.startswith(_JSON_START) or value == "null" else value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
