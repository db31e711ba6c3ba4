"""Slot lineages (beam search reorders) followed back: ``key_slots`` against a direct simulation of
every slot's history through random reorders."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from attnhooks.lineage import key_slots
from tests.property.common import SETTINGS


@st.composite
def evolutions(draw):
    """A prompt, then decode steps, each maybe after a reorder of the slots."""
    slots = draw(st.integers(1, 4))
    prompt = draw(st.integers(1, 5))
    steps = draw(st.integers(0, 8))
    reorders = [
        draw(st.none() | st.lists(st.integers(0, slots - 1), min_size=slots, max_size=slots)) for _ in range(steps)
    ]
    return slots, prompt, reorders


@SETTINGS
@given(evolutions())
def test_key_slots_equal_each_rows_simulated_history(evolution):
    slots, prompt, reorders = evolution
    width = prompt + len(reorders)
    parent = np.full((slots, width), -1, dtype=np.int32)
    history = [[b] * prompt for b in range(slots)]  # the slot that wrote each key of each slot's history
    rows = {b: [list(history[b])] for b in range(slots)}  # every row of a slot: its history then
    for step, order in enumerate(reorders):
        position = prompt + step
        if order is not None:
            parent[:, position] = order
            history = [list(history[p]) for p in order]
        for b in range(slots):
            history[b].append(b)
            rows[b].append(list(history[b]))
    for b in range(slots):
        ends = np.array([len(h) for h in rows[b]])
        got = key_slots(parent, b, ends)
        for i, h in enumerate(rows[b]):
            assert got[i, : len(h)].tolist() == h
