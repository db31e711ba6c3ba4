"""Errors and warnings raised by attnhooks.

Every error derives from :class:`AttnHooksError` and from the builtin exception that fits it, so
``except LookupError`` and ``except attnhooks.AttnHooksError`` both work. Messages say what was
given, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AttnHooksError",
    "AttnHooksWarning",
    "CaptureError",
    "CaptureStateError",
    "DropoutError",
    "FaithfulnessWarning",
    "ModuleSelectionError",
    "RecordOptionError",
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


class CaptureStateError(AttnHooksError, RuntimeError):
    """A :class:`~attnhooks.Capture` was used in a state that does not allow it."""


class AttnHooksWarning(UserWarning):
    """Root of every warning issued by attnhooks."""


class FaithfulnessWarning(AttnHooksWarning):
    """A captured attention did not reproduce the kernel's output (``verify=True``)."""
