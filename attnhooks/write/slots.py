"""A record's tensors written into its call's slot ``[pos, call]`` of its module's arrays, at its
rows and keys within the call; the call's :class:`~attnhooks.write.commit.Call` learns what was
written."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import row_count
from attnhooks.schema import ROWWISE
from attnhooks.write.commit import Call
from attnhooks.write.layout import ArrayLayout

__all__ = ["additive", "stored_rows", "write_record"]


def write_record(
    layout: ArrayLayout, module: Mapping[str, Any], base: tuple[int, int], state: Call, rec: Record
) -> None:
    """Write ``rec``'s tensors into its call's slot, at its rows and keys within the call.

    Args:
        layout: the store's arrays.
        module: the attributes of ``rec``'s module.
        base: ``(pos, call)``.
        state: the call; its stored keys, rows with attn, lineage, key mask and dense mask grow.
        rec: the call's first record, or a continuation (its ``q_offset`` past the call's).
    """
    row = rec.q_offset - state.q_offset
    key = rec.k_offset - state.k_offset
    n_rows = row_count(rec)
    rows = (slice(None), slice(row, row + n_rows))
    if rec.q is not None:
        layout.put(module, "q", base, rows, layout.cast(rec.q))
    if rec.k is not None:
        k = layout.cast(rec.k)
        layout.put(module, "k", base, (slice(None), slice(key, key + k.shape[2])), k)
        state.k_stored = max(state.k_stored, key + k.shape[2])
    if rec.attn is not None:
        attn, at = layout.attn(rec.attn), 0
        for a, b in rec.attn_rows or ((0, n_rows),):
            layout.put(module, "attn", base, (slice(None), slice(row + a, row + b)), attn[:, :, at : at + b - a])
            at += b - a
    state.stored[row:] = stored_rows(rec, n_rows)  # (rows a cropped cache replaced are cut)
    if rec.lse is not None:
        layout.put(module, "lse", base, rows, rec.lse.float().numpy())
    if rec.summary is not None:
        _write_summary(layout, module, base, state, rec.summary, row, n_rows)
    if rec.parents is not None:  # a reordered cache (beam search): the slot preceding each new key
        layout.put(module, "parent", base, (slice(key, key + rec.parents.shape[1]),), rec.parents.int().numpy())
        state.has_parent = True
    if rec.mask.key_valid is not None:  # the keys this record adds (earlier ones are written)
        new_keys = rec.mask.key_valid[:, rec.k_offset :].numpy()
        layout.put(module, "mask/key_valid", base, (slice(rec.k_offset, rec.k_len),), new_keys)
        state.has_key_valid = True
    if rec.mask.dense is not None:
        dense = additive(rec.mask.dense, n_rows, rec.k_len)
        layout.put(module, "mask/dense", base, rows, dense)
        state.dense = (max(state.dense[0], dense.shape[0]), max(state.dense[1], dense.shape[1]))


def _write_summary(
    layout: ArrayLayout,
    module: Mapping[str, Any],
    base: tuple[int, int],
    state: Call,
    summary: dict[str, torch.Tensor],
    row: int,
    n: int,
) -> None:
    """Row reductions at their rows; column sums added to the call's running total (a
    continuation's rows add to every key); the overview map as the first record made it."""
    for name, t in summary.items():
        value = t.numpy()
        if name in ROWWISE:
            layout.put(module, f"summary/{name}", base, (slice(None), slice(row, row + n)), value)
        elif name == "received":
            total = state.received
            if total is None or total.shape[:2] != value.shape[:2]:
                total = np.zeros(value.shape, dtype=np.float64)
            if total.shape[-1] < value.shape[-1]:
                total = np.pad(total, ((0, 0), (0, 0), (0, value.shape[-1] - total.shape[-1])))
            total[..., : value.shape[-1]] += value
            state.received = total
            layout.put(module, "summary/received", base, (), total.astype(np.float32))
        else:
            layout.put(module, f"summary/{name}", base, (), value)


def stored_rows(rec: Record, n_rows: int) -> list[bool]:
    """Which of the record's ``n_rows`` rows have their ``attn`` stored."""
    if rec.attn is None:
        return [False] * n_rows
    if rec.attn_rows is None:
        return [True] * n_rows
    flags = [False] * n_rows
    for a, b in rec.attn_rows:
        flags[a:b] = [True] * (b - a)
    return flags


def additive(dense: torch.Tensor, q_len: int, k_len: int) -> np.ndarray:
    """A dense mask as float32 ``[batch|1, heads|1, q_len, k_len]``, 0 / -inf for booleans."""
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    if dense.dtype == torch.bool:
        dense = torch.zeros(dense.shape, dtype=torch.float32).masked_fill(~dense, -math.inf)
    dense = dense.float().expand(dense.shape[0], dense.shape[1], q_len, k_len)
    return dense.contiguous().numpy()
