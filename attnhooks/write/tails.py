"""KV-cache continuation records ("tails") held by the writer thread, to be written in slabs: one
decode row per write would cost a chunk rewrite per token."""

from __future__ import annotations

from collections.abc import Iterator

from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import merge_contiguous
from attnhooks.write.budget import Budget

__all__ = ["Tails"]

_MAX_PARTS = 512  # records held per call before its rows are written anyway


class Tails:
    """The continuation records held per ``(module, call)``, and their staging bytes: those stay
    reserved in the budget until the rows are written (or the step is dropped)."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._parts: dict[tuple[str, int], list[Record]] = {}
        self._held = 0

    def hold(self, rec: Record, nbytes: int) -> bool:
        """Hold ``rec`` (its staging: ``nbytes``); True when the held rows should be written now: a
        dense mask (too large to hold), a quarter of the budget held, or many records of one call."""
        tail = self._parts.setdefault((rec.module, rec.call), [])
        tail.append(rec)
        self._held += nbytes
        return rec.mask.dense is not None or self._held > self._budget.limit // 4 or len(tail) >= _MAX_PARTS

    def slabs(self) -> Iterator[tuple[str, int, Record]]:
        """``(module, call, record)`` to write, one record per run of contiguous rows of a call."""
        for (name, call), tail in self._parts.items():
            for part in merge_contiguous(tail):
                yield name, call, part

    def drop(self) -> None:
        """Forget the held records (written, or their step dropped) and release their staging."""
        self._parts.clear()
        held, self._held = self._held, 0
        if held:
            self._budget.release(held)
