"""Reading a rank set: a store written under ``torch.distributed``, one group per rank.

The layout is :mod:`attnhooks.backends.subtree`'s. A :class:`RankSet` knows which ranks have started
writing and hands out one reader per rank, opened once on first use; the reader of the set itself
(its *head*) reads the lowest rank and is returned for that rank.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from attnhooks.backends.base import Backend
from attnhooks.backends.subtree import group, present, subtree
from attnhooks.errors import NotInStoreError

__all__ = ["RankReader", "RankSet"]


class RankReader(Protocol):
    """What a rank set needs of the readers it hands out: the rank each one reads."""

    @property
    def default_rank(self) -> int: ...


R = TypeVar("R", bound=RankReader)


class RankSet(Generic[R]):
    """The ranks of a rank set and a reader of each.

    Args:
        root: the backend of the whole set (its groups are ``rank<N>``).
        location: where the set is, for messages.
        head: the set's own reader, which reads the lowest rank.
        open_rank: makes the reader of one rank from that rank's backend and this set.

    Example:
        >>> ranks = RankSet(root, "memory://run", head=st, open_rank=lambda be, s: Store(be, _set=s))  # doctest: +SKIP
        >>> ranks.ids, ranks.rank(1).default_rank  # doctest: +SKIP
        ([0, 1], 1)
    """

    def __init__(self, root: Backend, location: str, head: R, open_rank: Callable[[Backend, RankSet[R]], R]) -> None:
        self.root = root
        self.location = location
        self.head = head
        self._open = open_rank
        self._lock = threading.Lock()  # dask may read from several threads
        self._readers: dict[int, R] = {}
        self.ids: list[int] = present(root)
        """The ranks that have started writing, ascending."""

    def refresh(self) -> None:
        """Re-read which ranks exist; readers of ranks are opened afresh from now on."""
        with self._lock:
            self._readers = {}
            self.ids = present(self.root)

    def lowest(self) -> Backend | None:
        """The lowest rank's backend, None while no rank has started writing."""
        return subtree(self.root, group(self.ids[0])) if self.ids else None

    def rank(self, rank: int) -> R:
        """The reader of ``rank`` (the head for the rank it reads).

        Raises:
            NotInStoreError: the set holds no such rank (the message lists those it holds).
        """
        if rank == self.head.default_rank and rank in self.ids:
            return self.head
        if rank not in self.ids:
            raise NotInStoreError(f"{self.location} has no rank {rank}; its ranks are {list(self.ids)}")
        with self._lock:
            reader = self._readers.get(rank)
            if reader is None:
                reader = self._readers[rank] = self._open(subtree(self.root, group(rank)), self)
        return reader
