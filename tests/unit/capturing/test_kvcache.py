"""KV caches found by behaviour, watched while a capture runs, and slot lineages followed back."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.capturing.kvcache import CacheWatch, find_cache, past_length
from attnhooks.lineage import key_slots


class ToyCache:
    """The two behaviours attnhooks relies on, and nothing else of transformers."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reordered: list[list[int]] = []

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.reordered.append(beam_idx.tolist())

    def crop(self, n: int) -> None:
        self.length = n if n >= 0 else self.length + n


def test_a_cache_is_found_whatever_its_argument_is_called():
    cache = ToyCache(3)
    assert find_cache((), {"cache": cache}) is cache
    assert find_cache((), {"past_key_values": cache}) is cache
    assert find_cache((), {"my_own_kv": cache, "x": torch.ones(2)}) is cache
    assert find_cache((torch.ones(1), cache), {}) is cache
    legacy = ((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)),)
    assert find_cache((), {"past": legacy}) is legacy and past_length(legacy) == 7
    assert find_cache((), {"ids": torch.ones(2, 3), "sizes": (1, 2), "names": ["a"]}) is None
    assert past_length(cache) == 3


def test_the_watch_composes_reorders_reads_crops_and_leaves_nothing_behind():
    cropped = []
    watch = CacheWatch(on_crop=cropped.append)
    cache = ToyCache(10)
    watch.follow(cache)
    cache.reorder_cache(torch.tensor([1, 0, 2]))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    # slot b now holds what slot [1, 0, 2][[2, 2, 0][b]] held at first
    assert watch.take_parents().tolist() == [2, 2, 1]
    assert watch.take_parents() is None
    cache.crop(-3)
    assert cropped == [7] and cache.length == 7
    assert cache.reordered == [[1, 0, 2], [2, 2, 0]], "the cache's own methods still run"
    watch.close()
    assert "reorder_cache" not in vars(cache) and "crop" not in vars(cache)


def test_the_watch_never_keeps_a_cache_alive():
    watch = CacheWatch()
    cache = ToyCache(4)
    watch.follow(cache)
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None and watch.cache is None
    watch.close()


def test_continuing_rejects_a_bad_past():
    with attnhooks.capture(torch.nn.Linear(2, 2)) as cap, pytest.raises(attnhooks.RecordOptionError):
        with cap.continuing(past=-1):
            pass


def test_key_slots_follow_each_rows_history_back():
    # 3 slots; keys 0-2 a shared prompt; before key 3 slots continued [0, 0, 1]; before key 4 [2, 1, 1]
    parent = np.full((3, 5), -1)
    parent[:, 3] = [0, 0, 1]
    parent[:, 4] = [2, 1, 1]
    rows = key_slots(parent, 0, np.array([3, 4, 5]))
    # slot 0's key 4 follows slot 2, whose key 3 followed slot 1: keys 0-2 are slot 1's
    assert rows.tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 2, 0]]
    # slot 1's key 4 follows itself, its key 3 followed slot 0
    assert key_slots(parent, 1, np.array([5])).tolist() == [[0, 0, 0, 1, 1]]
    assert key_slots(np.full((2, 0), -1), 1, np.array([2])).tolist() == [[1, 1]]
