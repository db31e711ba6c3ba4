"""The commit protocol of schema ``attnhooks/1`` (see :mod:`attnhooks.schema`), over the arrays of
an :class:`~attnhooks.write.layout.ArrayLayout`:

1. every record of a step is written at the step's position ``p`` (positions ``>= committed``
   hold nothing a reader trusts, so a killed writer only ever leaves ignorable garbage);
2. at the step's end the per-call tables (``calls``, ``info``, ``scalars``, ``rowkeys``), the
   ``steps`` entry and the tokens are written for every module;
3. the backend flushes, then the root attribute ``committed`` becomes ``p + 1`` in one atomic
   attribute write, and the backend flushes again.

Here: what the writer knows of each call of the open step (:class:`Call`), the tables it becomes,
and the step's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import batch_of, row_count
from attnhooks.schema import INFO, SCALARS, STATUS_COMPLETE, STATUS_WRITING, module_path
from attnhooks.write.attrs import Start, now, open_module
from attnhooks.write.layout import STEP_CHUNK, ArrayLayout, pow2

__all__ = ["Call", "Commits", "OpenStep", "new_call", "write_tokens"]


@dataclass
class Call:
    """What the writer knows about one call (stream) at the open position: the row of its ``info``
    (columns :data:`attnhooks.schema.INFO`) and ``scalars`` tables, and each row's keys."""

    batch: int
    q_len: int
    k_len: int
    k_stored: int
    q_offset: int
    k_offset: int
    causal: bool
    mask_offset: int
    window: int
    has_key_valid: bool
    dense: tuple[int, int]
    scale: float
    dropout: float
    softcap: float
    rowkeys: list[int] = field(default_factory=list)
    has_parent: bool = False  # a reordered cache wrote `parent` (beam search)
    received: np.ndarray | None = None  # running column sums of a summarised stream
    stored: list[bool] = field(default_factory=list)  # rows whose attn is stored (row windows)

    def extend(self, rec: Record, n_rows: int) -> None:
        """A KV-cache continuation ``rec`` of ``n_rows`` rows joins the call (it may replace rows
        after a cropped cache)."""
        row = rec.q_offset - self.q_offset
        self.q_len = row + n_rows
        self.k_len = rec.k_len if row < len(self.rowkeys) else max(self.k_len, rec.k_len)  # a cropped cache
        del self.rowkeys[row:]
        self.batch = max(self.batch, batch_of(rec))
        self.dropout = max(self.dropout, rec.dropout)
        if self.window < 0 and rec.mask.window is not None:  # a rolling cache began to drop keys
            self.window = rec.mask.window
        self.rowkeys.extend([rec.k_len] * n_rows)

    def cut(self, rows: int, keys: int) -> None:
        """A KV cache was cropped: keep the rows before stream row ``rows``, the keys before ``keys``."""
        row = max(0, rows - self.q_offset)
        del self.rowkeys[row:]
        del self.stored[row:]
        self.q_len = min(self.q_len, row)
        self.k_len = min(self.k_len, keys)


def new_call(rec: Record) -> Call:
    """The call that ``rec`` (its first record, or a restart of the stream) begins."""
    mask = rec.mask
    n_rows = row_count(rec)
    return Call(
        batch=batch_of(rec),
        q_len=n_rows,
        k_len=rec.k_len,
        k_stored=0,
        q_offset=rec.q_offset,
        k_offset=rec.k_offset,
        causal=mask.causal,
        mask_offset=mask.offset - rec.q_offset,
        window=-1 if mask.window is None else mask.window,
        has_key_valid=False,
        dense=(0, 0),
        scale=float(rec.scale),
        dropout=float(rec.dropout),
        softcap=float(rec.softcap or 0.0),
        rowkeys=[rec.k_len] * n_rows,
    )


@dataclass
class OpenStep:
    """The step being written: its position (-1: none), its calls by module, whether it has tokens."""

    pos: int = -1
    calls: dict[str, dict[int, Call]] = field(default_factory=dict)
    has_tokens: bool = False


class Commits:
    """The store's modules, their per-call tables and the root attributes that commit a step.

    Attributes:
        committed: positions committed so far.
        dropped: steps dropped so far (``when_full="drop"``), and ``dropped_steps`` which.
        modules: each module's attributes, once this run wrote a record of it.
    """

    def __init__(self, layout: ArrayLayout, start: Start) -> None:
        self.layout = layout
        self.committed = start.committed
        self.dropped = start.dropped
        self.dropped_steps = list(start.dropped_steps)
        self.modules: dict[str, dict[str, Any]] = {}
        self._earlier = start.modules  # an appended store's modules: "not called" is written for them
        self._status_set = not start.appending  # "writing" only once this run commits: a refused append changes nothing

    def module(self, rec: Record, pos: int) -> dict[str, Any]:
        """The attributes of ``rec``'s module; at its first record, its group and its tables at ``pos``."""
        module = self.modules.get(rec.module)
        if module is None:
            stored = self.layout.stored_dtype(rec)
            backend, fresh = self.layout.backend, self.layout.fresh
            module = self.modules[rec.module] = open_module(backend, rec, stored, self._earlier, fresh)
            self.tables(module_path(rec.module), pos, rec.call + 1, row_count(rec))
        return module

    def tables(self, path: str, pos: int, calls: int, width: int) -> None:
        """Make sure a module's per-call tables exist and hold ``calls`` calls of ``width`` rows at
        position ``pos``. Also called at a module's first record: creating an array costs 5-30 ms
        of file system and zarr latency, which then overlaps the forward instead of the commit."""
        ensure = self.layout.ensure
        ensure(f"{path}/calls", (pos + 1,), "int64", (STEP_CHUNK,), 0)
        ensure(f"{path}/info", (pos + 1, calls, len(INFO)), "int64", (1, 64, len(INFO)), 0)
        ensure(f"{path}/scalars", (pos + 1, calls, len(SCALARS)), "float64", (1, 64, len(SCALARS)), 0.0)
        ensure(f"{path}/rowkeys", (pos + 1, calls, width), "int64", (1, 1, pow2(width)), 0)

    def commit(self, step: OpenStep, number: int) -> None:
        """Commit ``step`` as the user's step ``number``: every module's tables, the tokens cleared
        when it has none, the ``steps`` entry, then ``committed`` between two flushes."""
        pos, be = step.pos, self.layout.backend
        for name in [*self.modules, *self._earlier.difference(self.modules)]:
            self._module_tables(module_path(name), pos, step.calls.get(name, {}))
        if not step.has_tokens:  # clear what a dropped or killed step may have left at this position
            for path, fill in (("tokens/ids", -1), ("tokens/text", "")):
                shape = self.layout.shape_of(path)
                if shape is not None and shape[0] > pos:
                    be.write(path, (pos,), np.full(shape[1:], fill, dtype=object if fill == "" else np.int64))
        self.layout.put_cell("steps", pos, number, fill=-1)
        be.flush()
        self.committed = max(self.committed, pos + 1)
        commit: dict[str, Any] = {"committed": self.committed, "dropped": self.dropped}
        if not self._status_set:
            commit.update(status=STATUS_WRITING, closed="")
            self._status_set = True
        be.set_attrs("", commit)
        be.flush()

    def drop(self, number: int) -> None:
        """Count the user's step ``number`` as dropped (the writer fell behind)."""
        self.dropped += 1
        self.dropped_steps.append(number)
        n = len(self.dropped_steps)
        be = self.layout.backend
        self.layout.put_cell("dropped_steps", n - 1, number, fill=-1)
        be.flush()
        be.set_attrs("", {"dropped": self.dropped})
        be.flush()

    def finish(self) -> None:
        """Mark the store complete and close the backend."""
        be = self.layout.backend
        if not self._status_set:  # an append that committed nothing leaves the store as it was
            be.close()
            return
        # no trimming: readers go by ``committed``, and shrinking makes zarr delete every chunk key
        # past the new end one by one (repair() does trim, once, after a crash)
        be.set_attrs("", {"status": STATUS_COMPLETE, "closed": now(), "dropped": self.dropped})
        be.flush()
        be.close()

    def _module_tables(self, path: str, pos: int, calls: dict[int, Call]) -> None:
        """The module's ``calls``, ``info``, ``scalars`` and ``rowkeys`` (and ``attn_stored``) at ``pos``."""
        n = max(calls) + 1 if calls else 0
        if not n:
            self.layout.put_cell(f"{path}/calls", pos, 0, fill=0)
            return
        info = np.zeros((n, len(INFO)), dtype=np.int64)
        scalars = np.zeros((n, len(SCALARS)), dtype=np.float64)
        width = max(len(c.rowkeys) for c in calls.values())
        rowkeys = np.zeros((n, width), dtype=np.int64)
        for c, st in calls.items():
            info[c] = (
                st.batch, st.q_len, st.k_len, st.k_stored, st.q_offset, st.k_offset,
                int(st.causal), st.mask_offset, st.window, int(st.has_key_valid), *st.dense,
            )  # fmt: skip
            scalars[c] = (st.scale, st.dropout, st.softcap)
            rowkeys[c, : len(st.rowkeys)] = st.rowkeys
        self.tables(path, pos, n, width)
        layout = self.layout  # whole rows (whole chunks: no chunk read back to change a part)
        layout.put_cell(f"{path}/calls", pos, n, fill=0)
        layout.write_at(f"{path}/info", (pos, slice(0, n)), info, fill=0)
        layout.write_at(f"{path}/scalars", (pos, slice(0, n)), scalars, fill=0.0)
        layout.write_at(f"{path}/rowkeys", (pos, slice(0, n), slice(0, width)), rowkeys, fill=0)
        self._stored_rows(path, pos, calls, width)
        self._clear_parents(path, pos, calls)

    def _stored_rows(self, path: str, pos: int, calls: dict[int, Call], width: int) -> None:
        """``attn_stored [S, C, Lq]``: which rows have attn, once row windows left some out (a store
        without it has attn for every row of every call that has attn)."""
        table = f"{path}/attn_stored"
        windows = any(not all(c.stored) for c in calls.values()) and self.layout.shape_of(f"{path}/attn") is not None
        if not windows and self.layout.shape_of(table) is None:
            return
        stored = np.zeros((len(calls) and max(calls) + 1, width), dtype=bool)
        for c, st in calls.items():
            stored[c, : len(st.stored)] = st.stored
        self.layout.ensure(table, (pos + 1, *stored.shape), "bool", (1, 1, pow2(width)), True)
        self.layout.write_at(table, (pos, slice(0, stored.shape[0]), slice(0, width)), stored, fill=True)

    def _clear_parents(self, path: str, pos: int, calls: dict[int, Call]) -> None:
        """Reset ``parent`` of the calls that wrote none at this position: a dropped or killed step may
        have left a lineage there that a reader would otherwise follow."""
        shape = self.layout.shape_of(f"{path}/parent")
        if shape is None or shape[0] <= pos:
            return
        for c, st in calls.items():
            if not st.has_parent and c < shape[1]:
                self.layout.backend.write(f"{path}/parent", (pos, c), np.full(shape[2:], -1, dtype=np.int32))


def write_tokens(layout: ArrayLayout, pos: int, ids: np.ndarray, text: list[list[str]] | None) -> None:
    """The step's token ids ``[batch, seq]`` (and their text) at ``pos``; the rest of the row is reset."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, ids.shape[-1]) if ids.ndim else ids
    b, n = ids.shape
    layout.ensure("tokens/ids", (pos + 1, b, n), "int64", (1, b, max(n, 1)), -1)
    layout.write_at("tokens/ids", (pos, slice(0, b), slice(0, n)), ids, fill=-1)
    if text is not None:
        arr = np.full((b, n), "", dtype=object)
        for i, row in enumerate(text[:b]):
            arr[i, : len(row[:n])] = row[:n]
        layout.ensure("tokens/text", (pos + 1, b, n), "str", (1, b, max(n, 1)), "")
        layout.write_at("tokens/text", (pos, slice(0, b), slice(0, n)), arr, fill="")
