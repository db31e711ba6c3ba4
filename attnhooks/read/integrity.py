"""Reads that cannot return damaged data silently: :class:`CheckedBackend`.

The backend already refuses a chunk that fails its checksum (:class:`StoreCorruptError` naming the
array and chunks). What only the reader can tell is that a chunk is *missing*: a read of a call's
tensors covers what the writer wrote for it, so every chunk under it must exist (a store written with
checksums keeps every chunk written, see :mod:`attnhooks.backends.integrity`). The wrapper checks that
for the tensor arrays of a module, and names the user step of a damaged chunk in every error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend, Selection
from attnhooks.errors import StoreCorruptError

__all__ = ["NAMED", "TENSORS", "CheckedBackend"]

TENSORS = ("q", "k", "lse")
"""The leaves written whole over what a read of them covers (a call's rows, or keys, every head and
dimension): every chunk under such a read must exist. ``attn`` rows are written up to their own key
counts only, so its reader says which part must exist (:meth:`CheckedBackend.require`)."""
NAMED = ("q", "k", "lse", "attn", "parent")
"""The leaves whose axis 0 is the step position (a damaged chunk's step can be named)."""


class CheckedBackend:
    """``backend`` with checked reads: every other attribute is the backend's own.

    Args:
        backend: the store's (or one rank's) backend.
        steps: the user step id of each committed position (called when an error needs it).
    """

    def __init__(self, backend: Backend, steps: Callable[[], list[int]]) -> None:
        self._backend = backend
        self._steps = steps
        self._missing = getattr(backend, "missing_chunks", None)  # optional capability

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    @property
    def unwrapped(self) -> Backend:
        return self._backend

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        try:
            out = self._backend.read(path, selection)
        except StoreCorruptError as err:
            raise self._named(err) from err.__cause__
        if path.rsplit("/", 1)[-1] in TENSORS:
            self.require(path, selection)
        return out

    def require(self, path: str, selection: Selection) -> None:
        """Raise :class:`StoreCorruptError` when a chunk under ``selection`` (written whole by the
        writer) is missing; nothing for a backend that cannot tell."""
        missing = self._missing(path, selection) if self._missing is not None else []
        if missing:
            err = StoreCorruptError(self._backend.location, path, missing, "missing (deleted after writing?)")
            raise self._named(err)

    def _named(self, err: StoreCorruptError) -> StoreCorruptError:
        """``err`` with the user steps of its chunks (axis 0 of a tensor array is the step position)."""
        if err.steps or err.array.rsplit("/", 1)[-1] not in NAMED:
            return err
        steps = self._steps()
        found = sorted({steps[c[0]] for c in err.chunks if c and c[0] < len(steps)})
        if not found:
            return err
        return StoreCorruptError(err.location, err.array, list(err.chunks), err.what, tuple(found))
