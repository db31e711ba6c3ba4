"""Storage backends: Zarr v3, HDF5 and in-memory, behind one small protocol (see :mod:`.base`)."""

from attnhooks.backends.base import MODES, Backend, Codec, backend_for, backend_names, register_backend

__all__ = ["MODES", "Backend", "Codec", "backend_for", "backend_names", "register_backend"]
