"""Streaming records into a store: a memory budget, a queue and one writer thread.

The model thread (inside hooks) only reserves budget, stages tensors and enqueues; the writer
thread converts to numpy, writes whole slabs through the backend and commits. The commit protocol
of schema ``attnhooks/1`` (see :mod:`attnhooks.schema`):

1. every record of a step is written at the step's position ``p`` (positions ``>= committed``
   hold nothing a reader trusts, so a killed writer only ever leaves ignorable garbage);
2. at the step's end the per-call tables (``calls``, ``info``, ``scalars``, ``rowkeys``), the
   ``steps`` entry and the tokens are written for every module;
3. the backend flushes, then the root attribute ``committed`` becomes ``p + 1`` in one atomic
   attribute write, and the backend flushes again.

A step that continues (a decode forward of a hand-written loop, micro-batches under a manual
``cap.step``) reuses its position and is committed again with its grown tables.

Errors in the writer thread stop it, release every waiting producer and resurface in the model
thread at its next :meth:`StoreWriter.admit` / :meth:`StoreWriter.close` as :class:`StoreWriteError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import platform
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from attnhooks.backends.base import Backend, Codec
from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import join
from attnhooks.errors import (
    AttnHooksError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    StoreOptionError,
    StoreStateError,
    StoreWriteError,
)
from attnhooks.schema import INFO, ROWWISE, SCALARS, SCHEMA, STATUS_COMPLETE, STATUS_WRITING, SUPPORTED, module_path

__all__ = ["Budget", "StoreOptions", "StoreWriter", "parse_bytes"]

_CHUNK_BYTES = 8 << 20
_SMALL_CHUNK_BYTES = 1 << 20  # below this, chunks grow over heads and samples: fewer, larger writes
_RAW_LEAVES = frozenset(
    {"q", "k", "lse", *(f"summary/{name}" for name in ("entropy", "topk_weight", "received", "sink", "band"))}
)  # written without compression by default: see StoreWriter._codec
_MIN_STEPS = 64  # step-axis capacity of a new array; it doubles when full (readers go by ``committed``)


@dataclass(frozen=True)
class StoreOptions:
    """How a capture writes its store (see :func:`attnhooks.capture` for each option)."""

    mode: str = "create"
    buffer: int = 1 << 30
    when_full: str = "block"
    dtype: str | None = None
    codec: Codec | None = None


def parse_bytes(value: int | str) -> int:
    """``1 << 30``, ``"512MiB"``, ``"1GiB"``, ``"2GB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", value, re.IGNORECASE)
        if match:
            unit = match.group(2).upper().rstrip("B").rstrip("I")
            power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
            base = 1024 if "I" in match.group(2).upper() or unit == "" else 1000
            return int(float(match.group(1)) * base**power)
    raise StoreOptionError(f"buffer={value!r}: use a number of bytes or a size such as '512MiB' or '2GiB'")


class Budget:
    """Bytes staged but not yet written; producers wait (or give up) when it is spent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.blocked_s = 0.0
        self._cond = threading.Condition()
        self._failed: BaseException | None = None

    def acquire(self, nbytes: int, wait: bool) -> bool:
        """Reserve ``nbytes``; with ``wait=False`` return False instead of waiting."""
        if nbytes > self.limit:
            raise StoreOptionError(
                f"one attention call needs {_size(nbytes)} of staging but the capture's buffer is only "
                f"{_size(self.limit)}: pass buffer= of at least {_size(nbytes)}, or record less "
                "(e.g. record=('q', 'k', 'lse'))"
            )
        with self._cond:
            if self.used + nbytes > self.limit and self._failed is None:
                if not wait:
                    return False
                start = time.perf_counter()
                self._cond.wait_for(lambda: self.used + nbytes <= self.limit or self._failed is not None)
                self.blocked_s += time.perf_counter() - start
            if self._failed is not None:
                raise _surface(self._failed)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._failed = error
            self._cond.notify_all()


@dataclass
class _Call:
    """What the writer knows about one call (stream) at the open position."""

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


@dataclass
class _Module:
    attrs: dict[str, Any]


_STOP = object()


class StoreWriter:
    """One store being written by one capture."""

    def __init__(self, backend: Backend, options: StoreOptions, meta: dict[str, Any], appending: bool = False) -> None:
        self.backend = backend
        self.options = options
        self.codec = options.codec or backend.default_codec
        self.budget = Budget(options.buffer)
        self.dropped = 0
        self.bytes_written = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._modules: dict[str, _Module] = {}
        self._calls: dict[str, dict[int, _Call]] = {}
        self._open_pos = -1
        self._tails: dict[tuple[str, int], list[Record]] = {}
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._held = 0
        self._has_tokens = False
        self._status_set = True
        self._committed = 0
        self._dropped_steps: list[int] = []
        self._closed = False
        # model-thread view of positions
        self._next_pos = 0
        self._last: tuple[int, int] | None = None  # (user step, position) of the last step begun
        self._ended = -1  # the last position committed at least once
        self.last_step: int | None = None
        if appending:
            self._resume()
        else:
            self._create(meta)
        self._thread = threading.Thread(target=self._run, name="attnhooks-writer", daemon=True)
        self._thread.start()

    # -- model thread -----------------------------------------------------------------------
    def admit(self, nbytes: int) -> bool:
        """Reserve staging for a record of ``nbytes``; False means drop the step (``when_full="drop"``)."""
        self.check()
        return self.budget.acquire(nbytes, wait=self.options.when_full == "block")

    def begin_step(self, step: int) -> None:
        """A captured step starts; the same step begun again (a continuation) keeps its position."""
        self.check()
        if self._last is not None and self._last[0] == step:
            return
        pos = self._next_pos
        self._next_pos += 1
        self._last = (step, pos)
        self._queue.put(("begin", pos))

    def put(self, rec: Record, nbytes: int, ready: Any = None) -> None:
        assert self._last is not None, "begin_step() first"
        self._queue.put(("record", self._last[1], rec, nbytes, ready))

    def dropout(self, module: str, call: int, p: float) -> None:
        if self._last is not None:
            self._queue.put(("dropout", self._last[1], module, call, p))

    def cut(self, module: str, call: int, rows: int, keys: int) -> None:
        """A KV cache was cropped: the call keeps its rows before stream row ``rows`` and its keys
        before position ``keys`` (the rows after were rejected draft tokens)."""
        if self._last is not None:
            self._queue.put(("cut", self._last[1], module, call, rows, keys))

    def tokens(self, ids: np.ndarray, text: list[list[str]] | None) -> None:
        if self._last is not None:
            self._queue.put(("tokens", self._last[1], ids, text))

    def end_step(self) -> None:
        """Commit the step begun last (again, when it continued)."""
        if self._last is not None:
            self._queue.put(("commit", self._last[1], self._last[0]))
            self._ended = self._last[1]

    def drop_step(self, count: bool = True) -> None:
        """Give up the rest of the step begun last: what it committed before stays, the rest is
        discarded and its position reused. ``count``: record it as dropped (the writer fell behind)
        rather than abandoned (its forward raised)."""
        if self._last is None:
            return
        step, pos = self._last
        self._queue.put(("drop", pos, step, count))
        if self._ended != pos:
            self._next_pos = pos
        self._last = None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued so far is written and committed."""
        self.check()
        done = threading.Event()
        self._queue.put(("sync", done))
        while not done.wait(0.05):
            if self._error is not None or not self._thread.is_alive():
                break
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    raise StoreWriteError(
                        f"the writer did not catch up within the timeout ({self.budget.used} bytes pending)"
                    )
        self.check()

    def check(self) -> None:
        """Raise the writer thread's error, if it had one."""
        if self._error is not None:
            raise _surface(self._error)

    def close(self) -> None:
        """Flush everything, mark the store complete, stop the thread; raise its error if any."""
        if self._closed:
            self.check()
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self.check()

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            held = False
            try:
                if msg is _STOP:
                    self._finish()
                    return
                held = bool(getattr(self, "_on_" + msg[0])(*msg[1:]))
            except BaseException as err:  # anything: the model thread must hear of it, never hang
                self._error = err
                self.budget.fail(err)
                self._drain()
                with contextlib.suppress(Exception):
                    self.backend.close()
                return
            finally:
                if msg is not _STOP and msg[0] == "record" and not held:
                    self.budget.release(msg[3])
                msg = None  # the record's tensors go now, not at the next message

    def _drain(self) -> None:
        while True:
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                return
            if msg is not _STOP and msg[0] == "record":
                self.budget.release(msg[3])

    def _on_sync(self, done: threading.Event) -> None:
        done.set()

    def _on_begin(self, pos: int) -> None:
        self._drop_tails()
        self._open_pos = pos
        self._calls = {}
        self._has_tokens = False

    def _on_record(self, pos: int, rec: Record, nbytes: int, ready: Any) -> bool:
        """Write a call's record, or hold a KV-cache continuation to write its rows in one slab
        later (one decode row per write would cost a chunk rewrite per token). Returns True
        when the record's budget is held, to be released when its rows are written."""
        if pos != self._open_pos:
            return False  # its step was dropped
        if ready is not None:
            ready.synchronize()
        module = self._module(rec)
        calls = self._calls.setdefault(rec.module, {})
        state = calls.get(rec.call)
        n_rows = int(_rows(rec))
        if state is None or rec.q_offset == 0:
            state = calls[rec.call] = _new_call(rec)
            state.rowkeys.extend([rec.k_len] * n_rows)
            self._write(module, (pos, rec.call), state, rec)
            return False
        row = rec.q_offset - state.q_offset
        state.q_len = row + n_rows
        state.k_len = rec.k_len if row < len(state.rowkeys) else max(state.k_len, rec.k_len)  # a cropped cache
        del state.rowkeys[row:]
        state.batch = max(state.batch, _batch(rec))
        state.dropout = max(state.dropout, rec.dropout)
        if state.window < 0 and rec.mask.window is not None:  # a rolling cache began to drop keys
            state.window = rec.mask.window
        state.rowkeys.extend([rec.k_len] * n_rows)
        tail = self._tails.setdefault((rec.module, rec.call), [])
        tail.append(rec)
        self._held += nbytes
        if rec.mask.dense is not None or self._held > self.budget.limit // 4 or len(tail) >= 512:
            self._flush_tails()
        return True

    def _write(self, module: _Module, base: tuple[int, int], state: _Call, rec: Record) -> None:
        """Write ``rec``'s tensors into its call's slot, at its rows and keys within the call."""
        row = rec.q_offset - state.q_offset
        key = rec.k_offset - state.k_offset
        n_rows = int(_rows(rec))
        if rec.q is not None:
            self._put(module, "q", base, (slice(None), slice(row, row + n_rows)), self._cast(rec.q))
        if rec.k is not None:
            k = self._cast(rec.k)
            self._put(module, "k", base, (slice(None), slice(key, key + k.shape[2])), k)
            state.k_stored = max(state.k_stored, key + k.shape[2])
        if rec.attn is not None:
            attn, at = self._attn(rec.attn), 0
            for a, b in rec.attn_rows or ((0, n_rows),):
                self._put(module, "attn", base, (slice(None), slice(row + a, row + b)), attn[:, :, at : at + b - a])
                at += b - a
        state.stored[row:] = _stored_rows(rec, n_rows)  # (rows a cropped cache replaced are cut)
        if rec.lse is not None:
            self._put(module, "lse", base, (slice(None), slice(row, row + n_rows)), rec.lse.float().numpy())
        if rec.summary is not None:
            self._write_summary(module, base, state, rec.summary, row, n_rows)
        if rec.parents is not None:  # a reordered cache (beam search): the slot preceding each new key
            self._put(module, "parent", base, (slice(key, key + rec.parents.shape[1]),), rec.parents.int().numpy())
            state.has_parent = True
        if rec.mask.key_valid is not None:  # the keys this record adds (earlier ones are written)
            new_keys = rec.mask.key_valid[:, rec.k_offset :].numpy()
            self._put(module, "mask/key_valid", base, (slice(rec.k_offset, rec.k_len),), new_keys)
            state.has_key_valid = True
        if rec.mask.dense is not None:
            dense = _additive(rec.mask.dense, n_rows, rec.k_len)
            self._put(module, "mask/dense", base, (slice(None), slice(row, row + n_rows)), dense)
            state.dense = (max(state.dense[0], dense.shape[0]), max(state.dense[1], dense.shape[1]))

    def _write_summary(
        self, module: _Module, base: tuple[int, int], state: _Call, summary: dict[str, torch.Tensor], row: int, n: int
    ) -> None:
        """Row reductions at their rows; column sums added to the call's running total (a
        continuation's rows add to every key); the overview map as the first record made it."""
        for name, t in summary.items():
            value = t.numpy()
            if name in ROWWISE:
                self._put(module, f"summary/{name}", base, (slice(None), slice(row, row + n)), value)
            elif name == "received":
                total = state.received
                if total is None or total.shape[:2] != value.shape[:2]:
                    total = np.zeros(value.shape, dtype=np.float64)
                if total.shape[-1] < value.shape[-1]:
                    total = np.pad(total, ((0, 0), (0, 0), (0, value.shape[-1] - total.shape[-1])))
                total[..., : value.shape[-1]] += value
                state.received = total
                self._put(module, "summary/received", base, (), total.astype(np.float32))
            else:
                self._put(module, f"summary/{name}", base, (), value)

    def _write_stored_rows(self, path: str, pos: int, calls: dict[int, _Call], width: int) -> None:
        """``attn_stored [S, C, Lq]``: which rows have attn, once row windows left some out (a store
        without it has attn for every row of every call that has attn)."""
        table = f"{path}/attn_stored"
        windows = any(not all(c.stored) for c in calls.values()) and self._shape_of(f"{path}/attn") is not None
        if not windows and self._shape_of(table) is None:
            return
        stored = np.zeros((len(calls) and max(calls) + 1, width), dtype=bool)
        for c, st in calls.items():
            stored[c, : len(st.stored)] = st.stored
        self._ensure(table, (pos + 1, *stored.shape), "bool", (1, 1, _pow2(width)), True)
        self.backend.write(table, (pos, slice(0, stored.shape[0]), slice(0, width)), stored)

    def _flush_tails(self) -> None:
        """Write the held continuation rows, one slab per call where they are contiguous."""
        for (name, call), tail in self._tails.items():
            state = self._calls[name][call]
            for part in _merge_contiguous(tail):
                self._write(self._modules[name], (self._open_pos, call), state, part)
        self._drop_tails()

    def _drop_tails(self) -> None:
        self._tails.clear()
        held, self._held = self._held, 0
        if held:
            self.budget.release(held)

    def _on_cut(self, pos: int, module: str, call: int, rows: int, keys: int) -> None:
        state = self._calls.get(module, {}).get(call) if pos == self._open_pos else None
        if state is None:
            return
        self._flush_tails()  # held rows are written first: the cut applies to everything before it
        row = max(0, rows - state.q_offset)
        del state.rowkeys[row:]
        del state.stored[row:]
        state.q_len = min(state.q_len, row)
        state.k_len = min(state.k_len, keys)

    def _on_dropout(self, pos: int, module: str, call: int, p: float) -> None:
        state = self._calls.get(module, {}).get(call) if pos == self._open_pos else None
        if state is not None:
            state.dropout = max(state.dropout, p)

    def _on_tokens(self, pos: int, ids: np.ndarray, text: list[list[str]] | None) -> None:
        if pos != self._open_pos:
            return
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, ids.shape[-1]) if ids.ndim else ids
        b, n = ids.shape
        self._has_tokens = True
        self._ensure("tokens/ids", (pos + 1, b, n), "int64", (1, b, max(n, 1)), -1)
        self._write_at("tokens/ids", (pos, slice(0, b), slice(0, n)), ids, fill=-1)
        if text is not None:
            arr = np.full((b, n), "", dtype=object)
            for i, row in enumerate(text[:b]):
                arr[i, : len(row[:n])] = row[:n]
            self._ensure("tokens/text", (pos + 1, b, n), "str", (1, b, max(n, 1)), "")
            self._write_at("tokens/text", (pos, slice(0, b), slice(0, n)), arr, fill="")

    def _on_commit(self, pos: int, step: int) -> None:
        if pos != self._open_pos:
            return
        self._flush_tails()
        be = self.backend
        for name in [*self._modules, *self._earlier_modules.difference(self._modules)]:
            calls = self._calls.get(name, {})
            n = max(calls) + 1 if calls else 0
            path = module_path(name)
            if not n:
                self._ensure(f"{path}/calls", (pos + 1,), "int64", (1024,), 0)
                be.write(f"{path}/calls", (pos,), np.asarray(n, dtype=np.int64))
                continue
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
            self._tables(path, pos, n, width)
            be.write(f"{path}/calls", (pos,), np.asarray(n, dtype=np.int64))
            be.write(f"{path}/info", (pos, slice(0, n)), info)
            be.write(f"{path}/scalars", (pos, slice(0, n)), scalars)
            be.write(f"{path}/rowkeys", (pos, slice(0, n), slice(0, width)), rowkeys)
            self._write_stored_rows(path, pos, calls, width)
            self._clear_parents(path, pos, calls)
        if not self._has_tokens:  # clear what a dropped or killed step may have left at this position
            for path, fill in (("tokens/ids", -1), ("tokens/text", "")):
                shape = self._shape_of(path)
                if shape is not None and shape[0] > pos:
                    be.write(path, (pos,), np.full(shape[1:], fill, dtype=object if fill == "" else np.int64))
        self._ensure("steps", (pos + 1,), "int64", (1024,), -1)
        be.write("steps", (pos,), np.asarray(step, dtype=np.int64))
        be.flush()
        self._committed = max(self._committed, pos + 1)
        commit: dict[str, Any] = {"committed": self._committed, "dropped": self.dropped}
        if not self._status_set:
            commit.update(status=STATUS_WRITING, closed="")
            self._status_set = True
        be.set_attrs("", commit)
        be.flush()

    def _clear_parents(self, path: str, pos: int, calls: dict[int, _Call]) -> None:
        """Reset ``parent`` of the calls that wrote none at this position: a dropped or killed step may
        have left a lineage there that a reader would otherwise follow."""
        shape = self._shape_of(f"{path}/parent")
        if shape is None or shape[0] <= pos:
            return
        for c, st in calls.items():
            if not st.has_parent and c < shape[1]:
                self.backend.write(f"{path}/parent", (pos, c), np.full(shape[2:], -1, dtype=np.int32))

    def _tables(self, path: str, pos: int, calls: int, width: int) -> None:
        """Make sure a module's per-call tables exist and hold ``calls`` calls of ``width`` rows at
        position ``pos``. Also called at a module's first record: creating an array costs 5-30 ms
        of file system and zarr latency, which then overlaps the forward instead of the commit."""
        self._ensure(f"{path}/calls", (pos + 1,), "int64", (1024,), 0)
        self._ensure(f"{path}/info", (pos + 1, calls, len(INFO)), "int64", (1, 64, len(INFO)), 0)
        self._ensure(f"{path}/scalars", (pos + 1, calls, len(SCALARS)), "float64", (1, 64, len(SCALARS)), 0.0)
        self._ensure(f"{path}/rowkeys", (pos + 1, calls, width), "int64", (1, 1, _pow2(width)), 0)

    def _on_drop(self, pos: int, step: int, count: bool) -> None:
        self._drop_tails()
        self._open_pos = -1
        self._calls = {}
        if not count:
            return
        self.dropped += 1
        self._dropped_steps.append(step)
        n = len(self._dropped_steps)
        self._ensure("dropped_steps", (n,), "int64", (1024,), -1)
        self.backend.write("dropped_steps", (n - 1,), np.asarray(step, dtype=np.int64))
        self.backend.flush()
        self.backend.set_attrs("", {"dropped": self.dropped})
        self.backend.flush()

    def _finish(self) -> None:
        be = self.backend
        if not self._status_set:  # an append that committed nothing leaves the store as it was
            be.close()
            return
        # no trimming: readers go by ``committed``, and shrinking makes zarr delete every chunk key
        # past the new end one by one (repair() does trim, once, after a crash)
        be.set_attrs("", {"status": STATUS_COMPLETE, "closed": _now(), "dropped": self.dropped})
        be.flush()
        be.close()

    # -- layout -------------------------------------------------------------------------------
    def _module(self, rec: Record) -> _Module:
        module = self._modules.get(rec.module)
        attrs = _module_attrs(rec, self._stored_dtype(rec))
        if module is None:
            path = module_path(rec.module)
            if self.backend.contains(path):
                old = self.backend.attrs(path)
                for key in ("heads", "kv_heads", "head_dim", "kind"):
                    if old.get(key) is not None and attrs.get(key) is not None and old[key] != attrs[key]:
                        raise StoreMismatchError(
                            f"appending to {self.backend.location}: module {rec.module!r} has {key}={attrs[key]} "
                            f"but the store holds {key}={old[key]}"
                        )
                attrs = {**old, **{k: v for k, v in attrs.items() if old.get(k) is None}}
            elif self._appending_modules:
                raise StoreMismatchError(
                    f"appending to {self.backend.location}: this capture records module {rec.module!r}, which the "
                    f"store does not have (it has {sorted(self._appending_modules)}); capture the same modules "
                    "or write a new store"
                )
            self.backend.create_group(path)
            self.backend.set_attrs(path, attrs)
            module = self._modules[rec.module] = _Module(attrs)
            self._tables(path, self._open_pos, rec.call + 1, int(_rows(rec)))
        return module

    def _put(
        self, module: _Module, leaf: str, base: tuple[int, int], inner: tuple[slice, ...], value: np.ndarray
    ) -> None:
        """Write ``value`` (a call's ``[batch, ...]`` block) at ``[pos, call, :batch, *inner]``."""
        path = module_path(module.attrs["name"], leaf)
        sel = _inner_selection(value.shape, inner)
        need = (base[0] + 1, base[1] + 1, *(s.stop for s in sel))
        if self._shape_of(path) is None:
            fill = {"mask/key_valid": True, "lse": -np.inf, "parent": -1}.get(leaf, 0)
            chunks = _chunks(need, value.dtype.itemsize, leaf)
            self._new_array(path, need, value.dtype.name, chunks, fill, self._codec(leaf, module))
        self._grow(path, need)
        self.backend.write(path, (*base, *sel), value)
        self.bytes_written += value.nbytes

    def _shape_of(self, path: str) -> tuple[int, ...] | None:
        """The array's shape, None when it does not exist; cached (this writer alone changes it)."""
        if path not in self._shapes:
            self._shapes[path] = self.backend.shape(path) if self.backend.contains(path) else None
        return self._shapes[path]

    def _new_array(
        self, path: str, need: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill: Any, codec: Codec
    ) -> None:
        shape = (max(need[0], _MIN_STEPS), *need[1:])  # room for steps ahead: one metadata write, not one per step
        self.backend.create_array(path, shape, dtype, chunks, fill, codec)
        self._shapes[path] = shape

    def _ensure(self, path: str, need: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill: Any) -> None:
        if self._shape_of(path) is None:
            self._new_array(path, need, dtype, chunks, fill, Codec("none", 0) if dtype == "str" else self.codec)
        else:
            self._grow(path, need)

    def _grow(self, path: str, need: tuple[int, ...]) -> None:
        shape = self._shape_of(path)
        assert shape is not None
        if all(s >= n for s, n in zip(shape, need)):
            return
        grown = [max(s, n) for s, n in zip(shape, need)]
        if need[0] > shape[0]:
            grown[0] = max(need[0], 2 * shape[0], _MIN_STEPS)
        self.backend.resize(path, tuple(grown))
        self._shapes[path] = tuple(grown)

    def _write_at(self, path: str, sel: tuple[Any, ...], value: np.ndarray, fill: Any) -> None:
        """Write ``value`` and reset the rest of the row to ``fill`` (stale data of a dropped step)."""
        shape = self._shape_of(path)
        assert shape is not None
        row = np.full(shape[1:], fill, dtype=value.dtype)
        row[tuple(sel[1:])] = value
        self.backend.write(path, (sel[0],), row)

    def _codec(self, leaf: str, module: _Module) -> Codec:
        """The store's codec; but float arrays of model-derived values (q, k, lse and the row
        summaries, in the model's own float dtype) are written raw unless ``compression=`` was
        given: zstd-1 saves 7-15% on them for 2.2x the writer's CPU (measured: 3.4 s vs 1.55 s per
        576 MiB of q), CPU a capture takes from the model's threads. Their chunks are never all
        zeros, so zarr's check for empty chunks is skipped too (1.25 s -> 0.61 s per 576 MiB).
        attn (exact zeros under masks), the overview maps, indices and masks compress 2-5x and
        stay compressed; so does widened bfloat16 (its low halves are zeros)."""
        if leaf not in _RAW_LEAVES:
            return self.codec
        widened = module.attrs["source_dtype"] not in (module.attrs["dtype"], None)
        raw = self.options.codec is None and not widened
        return dataclasses.replace(Codec("none", 0) if raw else self.codec, skip_empty=False)

    def _stored_dtype(self, rec: Record) -> str:
        t = rec.q if rec.q is not None else rec.k
        return _storage_dtype(t.dtype if t is not None else torch.float32, self.options.dtype)

    def _cast(self, t: torch.Tensor) -> np.ndarray:
        target = _storage_dtype(t.dtype, self.options.dtype)
        if target == "bfloat16-bits":
            return t.contiguous().view(torch.uint16).numpy()
        return t.to(getattr(torch, target)).numpy()

    def _attn(self, t: torch.Tensor) -> np.ndarray:
        return t.to(torch.float16 if self.options.dtype == "float16" else torch.float32).numpy()

    # -- store creation -----------------------------------------------------------------------
    _appending_modules: frozenset[str] = frozenset()
    _earlier_modules: frozenset[str] = frozenset()  # an appended store's modules: "not called" is written for them

    def _create(self, meta: dict[str, Any]) -> None:
        """Root attributes for a backend handed over already open (a path's backend was created
        with them, atomically)."""
        if self.backend.attrs("").get("schema") is None:
            self.backend.set_attrs("", root_attrs(self.backend, self.options, meta))
            self.backend.flush()

    def _resume(self) -> None:
        be = self.backend
        attrs = be.attrs("")
        if attrs.get("schema") not in SUPPORTED:
            raise StoreMismatchError(
                f"{be.location} has schema {attrs.get('schema')!r}; this version appends to {SCHEMA}"
            )
        if attrs.get("status") == STATUS_WRITING:
            raise StoreStateError(
                f"{be.location} was not closed (its writer is still running, or was killed); "
                f"if no writer is running, run attnhooks.repair({be.location!r}) before appending"
            )
        self._committed = self._next_pos = int(attrs.get("committed", 0))
        self.dropped = int(attrs.get("dropped", 0))
        if self._committed and be.contains("steps"):
            self.last_step = int(be.read("steps", (self._committed - 1,)))
        self._appending_modules = frozenset(be.children("modules")) if be.contains("modules") else frozenset()
        self._appending_modules = frozenset(be.attrs(f"modules/{m}").get("name", m) for m in self._appending_modules)
        self._earlier_modules = self._appending_modules
        if be.contains("dropped_steps"):
            n = int(attrs.get("dropped", 0))
            self._dropped_steps = [int(x) for x in be.read("dropped_steps", (slice(0, n),))]
        self._status_set = False  # "writing" only once this run commits: a refused append changes nothing


def _size(nbytes: int) -> str:
    """Bytes for people: exact below 1 KiB, else three significant digits and the byte count."""
    if nbytes < 1024:
        return f"{nbytes} B"
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << power:
            return f"{nbytes / (1 << power):.3g} {unit} ({nbytes} B)"
    raise AssertionError  # unreachable


def root_attrs(backend: type[Backend] | Backend, options: StoreOptions, meta: dict[str, Any]) -> dict[str, Any]:
    """The root attributes of a new store (status ``writing``, nothing committed)."""
    codec = options.codec or backend.default_codec
    return {
        "schema": SCHEMA,
        "status": STATUS_WRITING,
        "committed": 0,
        "dropped": 0,
        "created": _now(),
        "closed": "",
        "versions": _versions(backend),
        "compression": {"name": codec.name, "level": codec.level},
        **meta,
    }


def _surface(error: BaseException) -> BaseException:
    """The writer's error as the model thread should see it."""
    if isinstance(error, AttnHooksError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        out: StoreError = StoreFullError(
            f"the store's device is full: {error}; the steps committed before stay readable"
        )
    else:
        out = StoreWriteError(
            f"writing the store failed: {type(error).__name__}: {error}; the steps committed before stay readable"
        )
    out.__cause__ = error
    return out


def _merge_contiguous(parts: list[Record]) -> list[Record]:
    """Join consecutive continuation records whose rows and keys follow each other into one."""
    out: list[Record] = []
    run: list[Record] = []
    for part in parts:
        if run and not _follows(run[-1], part):
            out.append(_join(run))
            run = []
        run.append(part)
    if run:
        out.append(_join(run))
    return out


def _follows(prev: Record, part: Record) -> bool:
    rows = prev.q_offset + _rows(prev) == part.q_offset
    keys = prev.k is None or part.k is None or prev.k_offset + prev.k.shape[2] == part.k_offset
    windows = prev.attn_rows is None and part.attn_rows is None
    return (
        rows
        and keys
        and windows
        and prev.mask.dense is None
        and part.mask.dense is None
        and _batch(prev) == _batch(part)
    )


def _join(run: list[Record]) -> Record:
    """The run as one record; its mask is the last part's (whose ``key_valid`` covers every key)."""
    return dataclasses.replace(join(run), mask=run[-1].mask) if len(run) > 1 else run[0]


def _new_call(rec: Record) -> _Call:
    mask = rec.mask
    return _Call(
        batch=_batch(rec),
        q_len=int(_rows(rec)),
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
    )


def _rows(rec: Record) -> int:
    for t in (rec.q, rec.attn, rec.lse, _entropy(rec)):
        if t is not None:
            return int(t.shape[2])
    return 0


def _batch(rec: Record) -> int:
    for t in (rec.q, rec.k, rec.attn, rec.lse, _entropy(rec)):
        if t is not None:
            return int(t.shape[0])
    return 0


def _stored_rows(rec: Record, n_rows: int) -> list[bool]:
    """Which of the record's rows have their ``attn`` stored."""
    if rec.attn is None:
        return [False] * n_rows
    if rec.attn_rows is None:
        return [True] * n_rows
    flags = [False] * n_rows
    for a, b in rec.attn_rows:
        flags[a:b] = [True] * (b - a)
    return flags


def _entropy(rec: Record) -> torch.Tensor | None:
    return rec.summary.get("entropy") if rec.summary is not None else None


def _additive(dense: torch.Tensor, q_len: int, k_len: int) -> np.ndarray:
    """A dense mask as float32 ``[batch|1, heads|1, q_len, k_len]``, 0 / -inf for booleans."""
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    if dense.dtype == torch.bool:
        dense = torch.zeros(dense.shape, dtype=torch.float32).masked_fill(~dense, -math.inf)
    dense = dense.float().expand(dense.shape[0], dense.shape[1], q_len, k_len)
    return dense.contiguous().numpy()


def _inner_selection(shape: tuple[int, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    """Selection of a ``[batch, ...]`` block: ``inner`` slices for axes 1.., full extents elsewhere."""
    sel = [slice(0, shape[0])]
    for axis in range(1, len(shape)):
        given = inner[axis - 1] if axis - 1 < len(inner) else slice(None)
        start = given.start or 0
        sel.append(slice(start, start + shape[axis]))
    return tuple(sel)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def _chunks(shape: tuple[int, ...], itemsize: int, leaf: str) -> tuple[int, ...]:
    """Chunks of a ``[steps, calls, batch, ...]`` array: one step, one call, one sample (and one
    head of ``attn``); the sequence axes rounded up to powers of two and split so that a chunk
    stays under ~8 MiB. Where that leaves chunks under ~1 MiB (short sequences), they take more
    heads, then more samples: a chunk costs a file (or object) write of ~1 ms whatever its size."""
    chunks = [1, 1, 1, *shape[3:]]
    if leaf in ("q", "k", "lse", "mask/dense") or leaf.startswith("summary/"):
        seq_axis = 4
    elif leaf == "attn":
        chunks[3] = 1  # one head per chunk
        seq_axis = 4
    else:  # mask/key_valid [S, C, B, Lk]
        seq_axis = 3
    for axis in range(seq_axis, len(shape)):
        chunks[axis] = _pow2(shape[axis])
    while math.prod(chunks) * itemsize > _CHUNK_BYTES and chunks[seq_axis] > 16:
        chunks[seq_axis] //= 2
    # short sequences: every head, then several samples in one chunk (each chunk is a file write)
    for axis in (3, 2) if leaf == "attn" else (2,):
        whole = shape[axis] if axis == 3 else _pow2(shape[axis], floor=1)
        while chunks[axis] < whole and math.prod(chunks) * itemsize * 2 <= _SMALL_CHUNK_BYTES:
            chunks[axis] = min(whole, chunks[axis] * 2)
    return tuple(chunks)


def _storage_dtype(dtype: torch.dtype, option: str | None) -> str:
    if option == "float16":
        return "float16"
    if option == "float32":
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16-bits" if option == "bfloat16-bits" else "float32"
    return str(dtype).removeprefix("torch.")


def _module_attrs(rec: Record, stored: str) -> dict[str, Any]:
    layer = re.search(r"(?:^|\.)(\d+)(?:\.|$)", rec.module)
    source = rec.q if rec.q is not None else rec.k
    return {
        "name": rec.module,
        "kind": rec.kind,
        "heads": rec.heads,
        "kv_heads": int(rec.k.shape[1]) if rec.k is not None else None,
        "head_dim": int(source.shape[-1]) if source is not None else None,
        "scale": float(rec.scale),
        "causal": bool(rec.mask.causal),
        "window": rec.mask.window,
        "dtype": "bfloat16" if stored == "bfloat16-bits" else stored,
        "bits": stored == "bfloat16-bits",
        "source_dtype": str(source.dtype).removeprefix("torch.") if source is not None else None,
        "source": rec.source,
        "layer": int(layer.group(1)) if layer else None,
        "info_columns": list(INFO),
        "scalars_columns": list(SCALARS),
    }


def _versions(backend: type[Backend] | Backend) -> dict[str, str]:
    from attnhooks._version import __version__

    versions = {
        "attnhooks": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    engine = {"zarr": "zarr", "hdf5": "h5py"}.get(backend.name)
    if engine:
        versions[engine] = __import__(engine).__version__
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dumps_options(options: dict[str, Any]) -> str:
    return json.dumps(options, default=repr, sort_keys=True)
