"""Errors and warnings raised by attnhooks.

Every error derives from :class:`AttnHooksError` and from the builtin exception that fits it, so
``except LookupError`` and ``except attnhooks.AttnHooksError`` both work. Messages say what was
given, what was expected, and how to fix it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AnalysisError",
    "AttnHooksError",
    "AttnHooksWarning",
    "CacheMismatchError",
    "CaptureError",
    "CaptureStateError",
    "DropoutError",
    "EmitError",
    "FaithfulnessWarning",
    "ModelLoadError",
    "ModuleSelectionError",
    "NotAStoreError",
    "NotInStoreError",
    "ReadOptionError",
    "RecordOptionError",
    "SelectionError",
    "ShapeError",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreFullError",
    "StoreMismatchError",
    "StoreOptionError",
    "StoreStateError",
    "StoreWriteError",
    "TextInputError",
    "ViewError",
]


class AttnHooksError(Exception):
    """Root of every error raised by attnhooks."""


class ModuleSelectionError(AttnHooksError, LookupError):
    """A ``modules=`` selection names modules the model does not have."""


class RecordOptionError(AttnHooksError, ValueError):
    """An option of :func:`attnhooks.capture` has a value it cannot take."""


class CaptureError(AttnHooksError, RuntimeError):
    """An attention call could not be captured faithfully."""


class DropoutError(CaptureError):
    """Attention dropout is active and the capture was asked to refuse it."""


class CacheMismatchError(CaptureError):
    """A forward's KV cache contradicts the stream the capture recorded (its keys do not extend
    the recorded ones, or its length does not match): recording it would store wrong rows."""


class CaptureStateError(AttnHooksError, RuntimeError):
    """A :class:`~attnhooks.Capture` was used in a state that does not allow it."""


class StoreOptionError(AttnHooksError, ValueError):
    """A store location, backend, mode or storage option cannot be used as given."""


class StoreError(AttnHooksError, RuntimeError):
    """Root of the errors about a store on disk (or wherever its backend keeps it)."""


class StoreExistsError(StoreError, FileExistsError):
    """A store exists where a new one was to be created (``mode="create"``)."""


class NotAStoreError(StoreError, ValueError):
    """The location holds something that is not an attnhooks store, or a schema this version does not read."""


class StoreMismatchError(StoreError, ValueError):
    """Appending to a store whose schema, modules or shapes do not match this capture."""


class StoreStateError(StoreError):
    """A store is in a state that does not allow the operation (e.g. left open by a killed writer)."""


class StoreBusyError(StoreStateError):
    """Another live writer holds the store's lease (one writer per store): names its host and pid."""


class StoreWriteError(StoreError, OSError):
    """The writer thread failed; the steps committed before the failure stay readable."""


class StoreFullError(StoreWriteError):
    """The device holding the store is full (ENOSPC) or over quota."""


class StoreCorruptError(StoreError, ValueError):
    """Stored data is damaged: a chunk fails its checksum (or to decode), or a chunk of a committed
    step is missing. Names the store, the array, the chunks and, when the reader knows it, the steps.

    Attributes:
        location: the store.
        array: the array's path in the store (``modules/<module>/q``).
        chunks: grid coordinates of the damaged chunks (axis 0 is the step position).
        what: what is wrong with them ("missing", "fails to decode (...)").
        steps: the user step ids those chunks belong to, when known.
    """

    def __init__(
        self,
        location: str,
        array: str,
        chunks: list[tuple[int, ...]],
        what: str,
        steps: tuple[int, ...] = (),
        message: str | None = None,
    ) -> None:
        self.location, self.array, self.chunks, self.what, self.steps = location, array, tuple(chunks), what, steps
        shown = ", ".join(str(c) for c in chunks[:4]) + (f" and {len(chunks) - 4} more" if len(chunks) > 4 else "")
        at = f"step {', '.join(map(str, steps))}, " if steps else ""
        super().__init__(
            message
            or f"{location}: array {array}, {at}chunk(s) {shown} {what}; the store is damaged there: "
            "`attnhooks verify` lists every damaged step (the other steps read as before)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.location, self.array, list(self.chunks), self.what, self.steps, str(self))
        return (type(self), args)


class AttnHooksWarning(UserWarning):
    """Root of every warning issued by attnhooks."""


class FaithfulnessWarning(AttnHooksWarning):
    """A captured attention did not reproduce the kernel's output (``verify=True``)."""


class NotInStoreError(StoreError, LookupError):
    """The store has no such module, step, call, sample or array."""


class AnalysisError(AttnHooksError, ValueError):
    """An analysis function got an array or an argument it cannot use (shape, range, type)."""


class ViewError(AnalysisError):
    """A view was given data it cannot draw (wrong shape, empty selection...)."""


class SelectionError(AttnHooksError, IndexError):
    """A reader was asked for rows, keys or heads outside what the stored call has."""


class ReadOptionError(AttnHooksError, ValueError):
    """A reader option has a value it cannot take (e.g. ``method=``)."""


class EmitError(AttnHooksError, TypeError):
    """:func:`attnhooks.emit` was called without the tensors it needs."""


class ShapeError(AttnHooksError, ValueError):
    """Tensors of one attention call do not fit together (e.g. query heads not a multiple of key heads)."""


class ModelLoadError(AttnHooksError, LookupError):
    """A model could not be found or loaded locally."""


class TextInputError(AttnHooksError, ValueError):
    """The text to capture is missing or empty."""
