"""The messages from the model thread to the writer thread, records in batches.

Each message handed to the writer's queue wakes the writer thread, and on a busy model thread that
is a GIL round trip (a decode step of a 32-layer model makes 32 records). Records are therefore held
by the model thread and handed over together: up to ``BATCH`` of them, or a quarter of the staging
budget, and always before any other message (so the writer sees everything in the order it was put)
and before an admit that lacks room (what the writer has not seen could never free it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from attnhooks.errors import StoreWriteError
from attnhooks.write.budget import Budget

__all__ = ["BATCH", "STOP", "Outbox", "drain", "release", "unpack"]

BATCH = 64  # records handed to the writer thread at once
STOP = object()  # the last message: close the store


class Outbox:
    """The model thread's end of the writer's ``queue``; ``budget`` is the staging the records hold."""

    def __init__(self, queue_: queue.SimpleQueue[Any], budget: Budget) -> None:
        self._queue = queue_
        self._budget = budget
        self._held: list[tuple[Any, ...]] = []
        self._bytes = 0

    def record(self, msg: tuple[Any, ...], nbytes: int) -> None:
        """Hold a ``("record", ..., nbytes, ...)`` message; hand the batch over once it is full."""
        self._held.append(msg)
        self._bytes += nbytes
        if len(self._held) >= BATCH or self._bytes * 4 >= self._budget.limit:
            self.hand_over()

    def send(self, msg: Any) -> None:
        """Enqueue ``msg`` after the records held."""
        self.hand_over()
        self._queue.put(msg)

    def make_room(self, nbytes: int) -> None:
        """Before reserving ``nbytes``: when the budget lacks the room, the records held go to the
        writer (only it can free room, and only for what it has)."""
        if self._held and self._budget.used + nbytes > self._budget.limit:
            self.hand_over()

    def sync(self, alive: Callable[[], bool], timeout: float | None) -> None:
        """Wait until the writer has handled everything sent so far, or stopped (``alive()`` false).

        Raises:
            StoreWriteError: not caught up within ``timeout`` seconds.
        """
        done = threading.Event()
        self.send(("sync", done))
        while not done.wait(0.05) and alive():
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    raise StoreWriteError(
                        f"the writer did not catch up within the timeout ({self._budget.used} bytes pending)"
                    )

    def hand_over(self) -> None:
        """Give the writer the records held, as one ``("batch", [...])`` message."""
        if self._held:
            batch, self._held, self._bytes = self._held, [], 0
            self._queue.put(("batch", batch))


def unpack(msg: Any) -> list[Any]:
    """The messages one queue item carries (a batch: its records, in order)."""
    return msg[1] if msg is not STOP and msg[0] == "batch" else [msg]


def drain(queue_: queue.SimpleQueue[Any], budget: Budget) -> None:
    """Empty ``queue_`` (the writer failed): the staging of its records is returned."""
    while True:
        try:
            msg = queue_.get_nowait()
        except queue.Empty:
            return
        release(budget, unpack(msg))


def release(budget: Budget, messages: list[Any]) -> None:
    """Return the staging of the records among ``messages`` (they will not be written)."""
    for msg in messages:
        if msg is not STOP and msg[0] == "record":
            budget.release(msg[3])
