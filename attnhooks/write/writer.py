"""Streaming records into a store: a memory budget, a queue and one writer thread.

The model thread (inside hooks) only reserves budget, stages tensors and enqueues; the writer
thread converts to numpy, writes whole slabs through the backend and commits (the commit protocol
of schema ``attnhooks/1``: :mod:`attnhooks.write.commit`). A step that continues (a decode forward
of a hand-written loop, micro-batches under a manual ``cap.step``) reuses its position and is
committed again with its grown tables.

Errors in the writer thread stop it, release every waiting producer and resurface in the model
thread at its next :meth:`StoreWriter.admit` / :meth:`StoreWriter.close` as :class:`StoreWriteError`.

The pieces: :mod:`~attnhooks.write.budget` (staging bytes), :mod:`~attnhooks.write.layout` (the
arrays), :mod:`~attnhooks.write.slots` (a record into its call's slot), :mod:`~attnhooks.write.tails`
(continuations held for slab writes), :mod:`~attnhooks.write.commit` (per-call tables and the
commit), :mod:`~attnhooks.write.attrs` (creating, resuming, module groups).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from attnhooks.backends import stacks
from attnhooks.backends.base import Backend
from attnhooks.capturing.record import Record
from attnhooks.capturing.streams import row_count
from attnhooks.write.attrs import create, resume, root_attrs
from attnhooks.write.budget import Budget, surface
from attnhooks.write.commit import Commits, OpenStep, new_call, write_tokens
from attnhooks.write.layout import ArrayLayout
from attnhooks.write.options import StoreOptions, dumps_options, parse_bytes
from attnhooks.write.outbox import STOP, Outbox, drain, release, unpack
from attnhooks.write.slots import write_record
from attnhooks.write.tails import Tails

__all__ = ["Budget", "StoreOptions", "StoreWriter", "batched", "dumps_options", "parse_bytes", "root_attrs"]


def batched(backend: Backend) -> contextlib.AbstractContextManager[None]:
    """The backend's optional ``batched()`` (writes held and made together), or nothing."""
    hold = getattr(backend, "batched", None)
    return hold() if callable(hold) else contextlib.nullcontext()


class StoreWriter:
    """One store being written by one capture: the model thread's calls enqueue messages, which one
    writer thread handles in order (``("record", pos, ...)`` by :meth:`_on_record`, and so on).

    Attributes:
        backend: the store's backend (the writer thread closes it).
        options: the capture's store options.
        budget: the staging budget (``buffer=``) that the model thread reserves from.
        layout: the store's arrays (the writer thread's alone).
        last_step: the last user step of a store appended to (None for a new store).

    ``fresh``: the capture made the store empty (a path opened to create or overwrite it), so nothing is
    in it that this writer did not make, and it never asks the backend whether a path exists (~10 asks a
    module of a new store, 20-40 µs each through h5py or a file system's ``stat``, holding the GIL).
    """

    def __init__(
        self,
        backend: Backend,
        options: StoreOptions,
        meta: dict[str, Any],
        appending: bool = False,
        on_close: Callable[[bool], None] | None = None,
        fresh: bool = False,
    ) -> None:
        self.backend = backend = stacks.writing(backend, appending)  # schema attnhooks/2: stacked arrays
        # on_close(empty): called last at close; empty: a failed capture committed nothing
        self._on_close, self._abandoned = on_close, False
        self.options = options
        self.budget = Budget(options.buffer)
        self.layout = ArrayLayout(backend, options, fresh=fresh and not appending)
        self.codec = self.layout.codec
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._out = Outbox(self._queue, self.budget)  # the model thread's end: records in batches
        self._error: BaseException | None = None
        self._closed = False
        self._tails = Tails(self.budget)
        self._step = OpenStep()  # the writer thread's open position
        start = resume(backend) if appending else create(backend, options, meta)
        self._commits = Commits(self.layout, start)
        # model-thread view of positions
        self._next_pos = start.committed
        self._last: tuple[int, int] | None = None  # (user step, position) of the last step begun
        self._ended = -1  # the last position committed at least once
        self.last_step = start.last_step
        self._stored_steps = start.steps
        self._thread = threading.Thread(target=self._run, name="attnhooks-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Steps dropped so far (``when_full="drop"``), in this run and before it."""
        return self._commits.dropped

    @property
    def bytes_written(self) -> int:
        """Bytes of record tensors written so far."""
        return self.layout.bytes_written

    @bytes_written.setter
    def bytes_written(self, value: int) -> None:  # (a StepSink's attribute is settable)
        self.layout.bytes_written = value

    # -- model thread -----------------------------------------------------------------------
    def admit(self, nbytes: int) -> bool:
        """Reserve staging for a record of ``nbytes``; False means drop the step (``when_full="drop"``)."""
        self.check()
        self._out.make_room(nbytes)
        return self.budget.acquire(nbytes, wait=self.options.when_full == "block")

    def holds(self, step: int) -> bool:
        """True when the store held step ``step`` before this writer began (it is being appended to)."""
        return step in self._stored_steps

    def begin_step(self, step: int) -> None:
        """A captured step starts; the same step begun again (a continuation) keeps its position."""
        self.check()
        if self._last is not None and self._last[0] == step:
            return
        pos = self._next_pos
        self._next_pos += 1
        self._last = (step, pos)
        self._out.send(("begin", pos))

    def put(self, rec: Record, nbytes: int, ready: Any = None) -> None:
        """Hand ``rec`` (its staging: ``nbytes``, admitted) to the writer; ``ready``: an event to
        synchronize before its tensors are read (a copy from the device still running)."""
        assert self._last is not None, "begin_step() first"
        self._out.record(("record", self._last[1], rec, nbytes, ready), nbytes)

    def dropout(self, module: str, call: int, p: float) -> None:
        """The call ran with dropout ``p`` (the largest is kept)."""
        if self._last is not None:
            self._out.send(("dropout", self._last[1], module, call, p))

    def cut(self, module: str, call: int, rows: int, keys: int) -> None:
        """A KV cache was cropped: the call keeps its rows before stream row ``rows`` and its keys
        before position ``keys`` (the rows after were rejected draft tokens)."""
        if self._last is not None:
            self._out.send(("cut", self._last[1], module, call, rows, keys))

    def tokens(self, ids: np.ndarray, text: list[list[str]] | None) -> None:
        """The step's input ids ``[batch, seq]`` and, when known, their text."""
        if self._last is not None:
            self._out.send(("tokens", self._last[1], ids, text))

    def end_step(self) -> None:
        """Commit the step begun last (again, when it continued)."""
        if self._last is not None:
            self._out.send(("commit", self._last[1], self._last[0]))
            self._ended = self._last[1]

    def drop_step(self, count: bool = True) -> None:
        """Give up the rest of the step begun last: what it committed before stays, the rest is
        discarded and its position reused. ``count``: record it as dropped (the writer fell behind)
        rather than abandoned (its forward raised)."""
        if self._last is None:
            return
        step, pos = self._last
        self._abandoned |= not count
        self._out.send(("drop", pos, step, count))
        if self._ended != pos:
            self._next_pos = pos
        self._last = None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued so far is written and committed."""
        self.check()
        self._out.sync(lambda: self._error is None and self._thread.is_alive(), timeout)
        self.check()

    def check(self) -> None:
        """Raise the writer thread's error, if it had one."""
        if self._error is not None:
            raise surface(self._error)

    def close(self) -> None:
        """Flush everything, mark the store complete, stop the thread; raise its error if any."""
        if self._closed:
            self.check()
            return
        self._closed = True
        self._out.send(STOP)
        self._thread.join()
        if self._on_close is not None:
            self._on_close(self._abandoned and self._commits.committed == 0)
        self.check()

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            batch, msg = unpack(msg), None
            while batch:
                one = batch.pop(0)
                if not self._handle(one):
                    release(self.budget, batch)
                    return
                one = None  # the record's tensors go now, not at the next message

    def _handle(self, msg: Any) -> bool:
        """Handle one message; False when the thread is done (closed, or failed)."""
        held = False
        try:
            if msg is STOP:
                self._finish()
                return False
            if msg[0] == "record":  # (batches its own writes: a held continuation makes none)
                held = self._on_record(*msg[1:])
            else:
                with batched(self.backend):  # a message's writes in one trip (zarr: ~1 ms each alone)
                    getattr(self, "_on_" + msg[0])(*msg[1:])
        except BaseException as err:  # anything: the model thread must hear of it, never hang
            self._error = err
            self.budget.fail(err)
            drain(self._queue, self.budget)
            with contextlib.suppress(Exception):
                self.backend.close()
            return False
        finally:
            if msg is not STOP and msg[0] == "record" and not held:
                self.budget.release(msg[3])
        return True

    def _on_sync(self, done: threading.Event) -> None:
        done.set()

    def _on_begin(self, pos: int) -> None:
        self._tails.drop()
        self._step = OpenStep(pos)

    def _on_record(self, pos: int, rec: Record, nbytes: int, ready: Any) -> bool:
        """Write a call's record, or hold a KV-cache continuation for one slab of rows later (a row a write
        would rewrite a chunk per token); True when its budget is held until its rows are written."""
        if pos != self._step.pos:
            return False  # its step was dropped
        if ready is not None:
            ready.synchronize()
        state = self._step.calls.get(rec.module, {}).get(rec.call)
        if state is not None and rec.q_offset != 0:  # a continuation: held (its module is open)
            state.extend(rec, row_count(rec))
            if self._tails.hold(rec, nbytes):
                with batched(self.backend):
                    self._flush_tails()
            return True
        with batched(self.backend):  # the record's writes in one trip (zarr: ~1 ms each alone)
            module = self._commits.module(rec, pos)
            state = self._step.calls.setdefault(rec.module, {})[rec.call] = new_call(rec)
            write_record(self.layout, module, (pos, rec.call), state, rec)
        return False

    def _flush_tails(self) -> None:
        """Write the held continuation rows, one slab per call where they are contiguous."""
        for name, call, part in self._tails.slabs():
            state = self._step.calls[name][call]
            write_record(self.layout, self._commits.modules[name], (self._step.pos, call), state, part)
        self._tails.drop()

    def _on_cut(self, pos: int, module: str, call: int, rows: int, keys: int) -> None:
        state = self._step.calls.get(module, {}).get(call) if pos == self._step.pos else None
        if state is None:
            return
        self._flush_tails()  # held rows are written first: the cut applies to everything before it
        state.cut(rows, keys)

    def _on_dropout(self, pos: int, module: str, call: int, p: float) -> None:
        state = self._step.calls.get(module, {}).get(call) if pos == self._step.pos else None
        if state is not None:
            state.dropout = max(state.dropout, p)

    def _on_tokens(self, pos: int, ids: np.ndarray, text: list[list[str]] | None) -> None:
        if pos != self._step.pos:
            return
        self._step.has_tokens = True
        write_tokens(self.layout, pos, ids, text)

    def _on_commit(self, pos: int, step: int) -> None:
        if pos != self._step.pos:
            return
        self._flush_tails()
        self._commits.commit(self._step, step)

    def _on_drop(self, pos: int, step: int, count: bool) -> None:
        self._tails.drop()
        self._step = OpenStep()
        if count:
            self._commits.drop(step)

    def _finish(self) -> None:
        self._commits.finish()
