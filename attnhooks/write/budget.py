"""The staging budget between the model thread and the writer thread, and how the writer's error
reaches the model thread."""

from __future__ import annotations

import errno
import threading
import time

from attnhooks.errors import AttnHooksError, StoreError, StoreFullError, StoreOptionError, StoreWriteError

__all__ = ["Budget", "surface"]


class Budget:
    """Bytes staged but not yet written; producers wait (or give up) when it is spent.

    Attributes:
        limit: the capture's ``buffer=`` in bytes.
        used: bytes reserved now.
        peak: the most bytes reserved at once.
        blocked_s: seconds producers spent waiting for room.

    Example:
        >>> budget = Budget(100)
        >>> budget.acquire(80, wait=False), budget.acquire(40, wait=False)
        (True, False)
        >>> budget.release(80); budget.acquire(40, wait=False)
        True
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.blocked_s = 0.0
        self._cond = threading.Condition()
        self._failed: BaseException | None = None

    def acquire(self, nbytes: int, wait: bool) -> bool:
        """Reserve ``nbytes``; with ``wait=False`` return False instead of waiting.

        Raises:
            StoreOptionError: ``nbytes`` exceeds the whole budget (waiting would never end).
            StoreError: the writer failed (:meth:`fail`), before or while waiting; see :func:`surface`.
        """
        if nbytes > self.limit:
            raise StoreOptionError(
                f"one attention call needs {_size(nbytes)} of staging but the capture's buffer is only "
                f"{_size(self.limit)}: pass buffer= of at least {_size(nbytes)}, or record less "
                "(e.g. record=('q', 'k', 'lse'))"
            )
        with self._cond:
            if self.used + nbytes > self.limit and self._failed is None:
                if not wait:
                    return False
                start = time.perf_counter()
                self._cond.wait_for(lambda: self.used + nbytes <= self.limit or self._failed is not None)
                self.blocked_s += time.perf_counter() - start
            if self._failed is not None:
                raise surface(self._failed)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def release(self, nbytes: int) -> None:
        """Return ``nbytes`` reserved before; wakes the producers waiting for room."""
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer stopped on ``error``: every producer, waiting or not, raises it from now on."""
        with self._cond:
            self._failed = error
            self._cond.notify_all()


def surface(error: BaseException) -> BaseException:
    """The writer's error as the model thread should see it: an :class:`AttnHooksError` as it is, a
    full device as :class:`StoreFullError`, anything else as :class:`StoreWriteError` (chained)."""
    if isinstance(error, AttnHooksError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        out: StoreError = StoreFullError(
            f"the store's device is full: {error}; the steps committed before stay readable"
        )
    else:
        out = StoreWriteError(
            f"writing the store failed: {type(error).__name__}: {error}; the steps committed before stay readable"
        )
    out.__cause__ = error
    return out


def _size(nbytes: int) -> str:
    """Bytes for people: exact below 1 KiB, else three significant digits and the byte count."""
    if nbytes < 1024:
        return f"{nbytes} B"
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << power:
            return f"{nbytes / (1 << power):.3g} {unit} ({nbytes} B)"
    raise AssertionError  # unreachable
