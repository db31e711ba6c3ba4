"""Which batch slot holds each key of a slot's history, when a KV cache's slots were reordered.

Beam search reorders the cache's batch slots between decode steps: slot ``b`` continues the history
of slot ``beam_idx[b]``. A capture stores each key once, in the slot that wrote it, with
``parent[b, j]``: the slot whose keys precede key ``j`` in the history of slot ``b`` when it wrote
key ``j`` (``-1``: slot ``b`` itself). Following it back gives every row's keys exactly, for the
slots that survived and for those that were dropped. Numpy only (the reader needs no torch).
"""

from __future__ import annotations

import numpy as np

__all__ = ["key_slots"]


def key_slots(parent: np.ndarray, sample: int, ends: np.ndarray) -> np.ndarray:
    """The slot holding each key of the rows of ``sample``.

    Args:
        parent: ``[batch, keys]`` int, the slot preceding each key (``-1``: the slot itself); keys
            past its width precede themselves.
        sample: the batch slot whose rows are read.
        ends: ``[rows]`` the number of keys each row attended (its history is keys ``[0, end)``,
            the last one written by ``sample``).

    Returns:
        ``[rows, max(ends)]`` int64: the slot whose stored key ``j`` row ``i`` attended, for
        ``j < ends[i]`` (``sample`` beyond).

    Example:
        >>> parent = np.array([[-1, -1, 1], [-1, -1, 1]])   # key 2: both slots continued slot 1
        >>> key_slots(parent, 0, np.array([2, 3])).tolist()
        [[0, 0, 0], [1, 1, 0]]
    """
    batch = parent.shape[0]
    table = np.where(parent < 0, np.arange(batch)[:, None], parent).astype(np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    width = int(ends.max()) if ends.size else 0
    out = np.full((ends.size, width), sample, dtype=np.int64)
    slot = np.full(ends.size, sample, dtype=np.int64)
    for j in range(width - 1, 0, -1):  # key j's slot is known: step to the slot of key j - 1
        live = ends > j
        out[live, j] = slot[live]
        if j < table.shape[1]:
            slot = np.where(live, table[slot, j], slot)
    if width:
        out[:, 0] = slot
    return out
