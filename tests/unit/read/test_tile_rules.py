"""The units :class:`~attnhooks.read.tiles.CallReader` delegates to: the compact mask rule
(:mod:`attnhooks.read.visibility`), softmax from lse (:mod:`attnhooks.read.softmax`), and the
store's cache of call readers (:class:`~attnhooks.read.reads.ReaderCache`)."""

from __future__ import annotations

import numpy as np
import pytest

from attnhooks.read.reads import ReaderCache
from attnhooks.read.softmax import logsumexp_blocks, probabilities
from attnhooks.read.visibility import Visibility

RULES = [
    Visibility(causal=False, diagonal=0, window=None),
    Visibility(causal=True, diagonal=0, window=None),
    Visibility(causal=True, diagonal=3, window=None),  # rows continue a cache of 3 keys
    Visibility(causal=True, diagonal=2, window=2),
    Visibility(causal=False, diagonal=1, window=3),
]


def _allowed_by_rule(rule: Visibility, i: int, j: int, rowkeys: np.ndarray, key_valid: np.ndarray | None) -> bool:
    """The rule of the module docstring, one entry at a time."""
    ok = j < rowkeys[i]
    ok &= not rule.causal or j <= i + rule.diagonal
    ok &= rule.window is None or i + rule.diagonal - j < rule.window
    return bool(ok and (key_valid is None or key_valid[j]))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("padded", [False, True])
def test_allowed_is_the_rule_entry_by_entry_on_any_tile(rule, padded):
    q_len, k_len = 6, 9
    rowkeys = np.array([4, 5, 6, 9, 9, 7])
    key_valid = np.array([False, True, True, True, False, True, True, True, True]) if padded else None
    full = np.array([[_allowed_by_rule(rule, i, j, rowkeys, key_valid) for j in range(k_len)] for i in range(q_len)])
    for rows in (slice(0, q_len), slice(2, 5), slice(4, 4)):
        for cols in (slice(0, k_len), slice(1, 6), slice(7, 9)):
            got = rule.allowed(rows, cols, rowkeys[rows], key_valid)
            np.testing.assert_array_equal(got, full[rows, cols])


@pytest.mark.parametrize("rule", RULES)
def test_live_cols_lies_within_the_tile_and_covers_every_allowed_key(rule):
    rowkeys = np.array([4, 5, 6, 9, 9, 7])
    for rows in (slice(0, 6), slice(0, 1), slice(3, 5)):
        for cols in (slice(0, 9), slice(2, 6)):
            allowed = rule.allowed(rows, cols, rowkeys[rows], None)
            live = rule.live_cols(rows, cols, rowkeys[rows])
            assert cols.start <= live.start <= live.stop <= cols.stop
            inside = np.zeros(cols.stop - cols.start, dtype=bool)
            inside[live.start - cols.start : live.stop - cols.start] = True
            assert not allowed[:, ~inside].any(), f"{rows} sees keys outside {live}"
    assert rule.live_cols(slice(2, 2), slice(1, 9), rowkeys[2:2]) == slice(1, 1), "no rows: nothing live"


def test_live_cols_stops_at_the_causal_diagonal_and_starts_at_the_window():
    rowkeys = np.full(4, 9)
    assert Visibility(True, 0, None).live_cols(slice(0, 2), slice(0, 9), rowkeys[:2]) == slice(0, 2)
    assert Visibility(True, 3, 2).live_cols(slice(2, 4), slice(0, 9), rowkeys[2:]) == slice(4, 7)
    assert Visibility(False, 0, None).live_cols(slice(0, 2), slice(0, 9), np.array([3, 5])) == slice(0, 5)


def test_logsumexp_blocks_is_the_row_logsumexp_whatever_the_blocks():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 10)).astype(np.float32) * 4
    s[0, 1, 3:] = -np.inf  # a row that sees three keys
    s[1, 2, :] = -np.inf  # a row that sees none
    with np.errstate(divide="ignore"):
        expected = np.log(np.exp(s.astype(np.float64)).sum(-1)).astype(np.float32)
    for size in (1, 3, 10):
        blocks = [s[..., a : a + size] for a in range(0, 10, size)]
        got = logsumexp_blocks(blocks, (2, 3))
        assert got.dtype == np.float32 and got[1, 2] == -np.inf
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert logsumexp_blocks([], (2, 0)).shape == (2, 0)


def test_probabilities_sum_to_one_and_rows_that_see_nothing_are_zero():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    s[0, 0, 2:] = -np.inf
    s[1, 1, :] = -np.inf
    s[1, 2, 0] = -200.0  # exp underflows to a subnormal: flushed to 0
    lse = logsumexp_blocks([s], (2, 3))
    p = probabilities(s.copy(), lse)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), [[1, 1, 1], [1, 0, 1]], rtol=1e-6)
    assert (p[0, 0, 2:] == 0).all() and p[1, 2, 0] == 0.0


def test_reader_cache_keeps_the_most_recent_and_opens_each_once():
    cache = ReaderCache(size=2)
    opened: list[tuple[str, int, int, int]] = []

    def get(key: tuple[str, int, int, int]) -> object:
        def open_reader() -> object:
            opened.append(key)
            return object()

        return cache.get(key, open_reader)

    a, b = ("a", 0, 0, 0), ("b", 0, 0, 0)
    first = get(a)
    assert get(a) is first and opened == [a], "opened once"
    get(b)
    get(a)  # a is now the most recent: b goes first
    get(("c", 0, 0, 0))
    assert len(cache) == 2
    assert get(a) is first and opened == [a, b, ("c", 0, 0, 0)]
    get(b)
    assert opened[-1] == b, "b was evicted and opened again"
    cache.clear()
    assert len(cache) == 0
