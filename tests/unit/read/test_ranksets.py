"""Rank-set navigation: which ranks there are, the head for the lowest, one reader per rank opened
once, and a refresh that sees ranks that started later. torch.distributed's answer is faked, as in
tests/unit/test_ranks.py."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

import attnhooks
from attnhooks.backends.base import Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.subtree import LAYOUT, group, present, subtree
from attnhooks.capturing.distributed import RankInfo
from attnhooks.errors import NotInStoreError
from attnhooks.read.ranksets import RankSet

from .stores import inputs, layers

CAPTURE = importlib.import_module("attnhooks.capturing.session")


@pytest.fixture
def write_rank(monkeypatch, memory_location):
    """``write_rank(r, steps)``: capture ``steps`` steps as rank r of 4 into the rank set."""
    model = layers(2)

    def write(rank: int, steps: int = 1) -> None:
        monkeypatch.setattr(CAPTURE, "current", lambda require=False: RankInfo(rank, 4))
        with attnhooks.capture(model, store=memory_location) as cap, torch.no_grad():
            for step in range(steps):
                cap.step = step
                model(inputs(10 * rank + step, length=3 + rank))

    return write


@dataclass
class _Reader:
    """A stand-in for a Store: the rank it reads, from its backend's root attributes."""

    backend: Backend
    ranks: RankSet[_Reader] | None = None

    @property
    def default_rank(self) -> int:
        return int(self.backend.attrs("").get("rank", 0))


def _set(location: str) -> tuple[RankSet[_Reader], _Reader, list[Backend]]:
    """The rank set at ``location``, its head (a reader of the lowest rank) and the backends it opened."""
    root = MemoryBackend.open(location, "r")
    opened: list[Backend] = []

    def open_rank(backend: Backend, ranks: RankSet[_Reader]) -> _Reader:
        opened.append(backend)
        return _Reader(backend, ranks)

    head = _Reader(subtree(root, group(present(root)[0])))
    return RankSet(root, location, head, open_rank), head, opened


def test_the_ranks_the_head_and_one_reader_per_rank(write_rank, memory_location):
    for rank in (2, 0, 1):
        write_rank(rank)
    ranks, head, opened = _set(memory_location)
    assert ranks.ids == [0, 1, 2]
    lowest = ranks.lowest()
    assert lowest is not None and lowest.attrs("")["rank"] == 0
    assert ranks.rank(0) is head and opened == [], "the head reads the lowest rank"
    one = ranks.rank(1)
    assert one.default_rank == 1 and one.ranks is ranks
    assert ranks.rank(1) is one and len(opened) == 1, "opened once"
    assert ranks.rank(2).default_rank == 2 and len(opened) == 2


def test_a_missing_rank_lists_the_ranks_there_are(write_rank, memory_location):
    write_rank(0)
    write_rank(2)
    ranks, _, _ = _set(memory_location)
    with pytest.raises(NotInStoreError, match=r"has no rank 1; its ranks are \[0, 2\]"):
        ranks.rank(1)


def test_an_empty_set_has_no_lowest_rank(memory_location):
    root = MemoryBackend.open(memory_location, "w", {"layout": LAYOUT})
    assert RankSet(root, memory_location, _Reader(root), lambda be, s: _Reader(be, s)).lowest() is None


def test_refresh_sees_ranks_that_started_later_and_reopens_readers(write_rank, memory_location):
    write_rank(0)
    write_rank(1)
    ranks, _, opened = _set(memory_location)
    first = ranks.rank(1)
    write_rank(3)
    assert ranks.ids == [0, 1], "ranks are read when the set is made or refreshed"
    ranks.refresh()
    assert ranks.ids == [0, 1, 3] and ranks.rank(3).default_rank == 3
    assert ranks.rank(1) is not first and len(opened) == 3


def test_a_store_navigates_its_ranks_and_a_refresh_reaches_the_rank_stores(write_rank, memory_location):
    write_rank(1, steps=2)
    write_rank(0, steps=3)
    with attnhooks.open_store(memory_location) as st:
        one = st.rank(1)
        assert st.rank_set and st.ranks == one.ranks == [0, 1] and st.world_size == 4
        assert st.steps == [0, 1, 2] and one.steps == [0, 1] and one.default_rank == 1
        assert one.rank(0) is st and one.rank(1) is one and st.rank(1) is one
        assert st.info("0.self_attn", 0, rank=1)["q_len"] == 4 and st.info("0.self_attn", 0)["q_len"] == 3
        write_rank(2)
        st.refresh()
        assert one.ranks == [0, 1, 2], "a rank's store sees the set's refresh"
        assert one.rank(2).default_rank == 2 and st.rank(2) is one.rank(2)
        with pytest.raises(NotInStoreError, match=r"no rank 7; its ranks are \[0, 1, 2\]"):
            one.attention("0.self_attn", 0, rank=7)


def test_a_plain_store_is_its_only_rank(store):
    assert not store.rank_set and store.ranks == [0] and store.rank(0) is store
    with pytest.raises(NotInStoreError, match=r"has no rank 1; its ranks are \[0\]"):
        store.rank(1)
