"""Recorder: attention events to Records, per step, call and KV-cache stream (the records themselves
are built by :mod:`attnhooks.capturing.build`).

Call indices: within a step, the n-th call of a module gets index n. A *continuation* forward
(a KV-cache decode step or a chunk of a chunked prefill) does not open new calls: its n-th call of
a module continues the n-th call of that module in the forward it continues, and the record keeps
only the new query rows and the keys not recorded before, so a generation of N tokens keeps
O(N·d) of q and k.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.build import RECORDABLE, RecordBuilder, RecordOptions
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.kvcache import KeyChecks, Past, key_parents, looks_cross, unused_slots_removed
from attnhooks.capturing.record import Record
from attnhooks.capturing.staging import Stager
from attnhooks.capturing.streams import cut_stream
from attnhooks.errors import CacheMismatchError, DropoutError, FaithfulnessWarning

__all__ = ["RECORDABLE", "Listener", "RecordOptions", "Recorder"]


class Listener(Protocol):
    """Where records go besides ``Recorder.records`` (a store writer)."""

    def put(self, rec: Record, nbytes: int, ready: Any = None) -> None: ...

    def dropout(self, module: str, call: int, p: float) -> None: ...

    def cut(self, module: str, call: int, rows: int, keys: int) -> None: ...


_TAIL = 32  # keys a self-attention stream keeps of itself, to check the next forward's cache against


@dataclass
class _Stream:
    rows: int  # query rows recorded so far
    keys: int  # keys recorded so far (positions, also past those a rolling cache dropped)
    cross: bool
    tail: torch.Tensor | None = None  # its last keys [batch, kv_heads, n, head_dim], positions up to `keys`


def _tail(k: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The last keys of a stream, that the next forward's cache is checked against: on the CPU the record's
    own copy of its new keys (no second copy), else a copy of the kernel's last ``_TAIL`` keys. A crop past
    them (Hugging Face's assisted decoding keeps at least a forward's first new key) leaves only the counts
    checked. (The record's copy is never written to; the recycler does not hand out a buffer held here.)"""
    if kept is not None and kept.shape[2] > 0 and kept.is_cpu and k.is_cpu:
        return kept
    with torch._C.DisableTorchFunction():  # our own ops: no mode sees them
        return k.detach()[:, :, -_TAIL:].clone()


@dataclass
class Recorder:
    """Per-step call bookkeeping and KV-cache streams of one capture; ``builder`` makes the records."""

    options: RecordOptions
    records: list[Record] = field(default_factory=list)
    keep: bool = True
    listener: Listener | None = None
    admit: Callable[[int], bool] | None = None
    stager: Stager = field(default_factory=Stager)
    seen: set[str] = field(default_factory=set)
    dropping: bool = False
    step: int = 0
    _calls: dict[str, int] = field(default_factory=dict)
    _pass_first: dict[str, int] = field(default_factory=dict)
    _cursor: dict[str, int] = field(default_factory=dict)
    _continuing: bool = False
    _rows: bool = False  # decode rows of this forward may go through row()
    _streams: dict[tuple[str, int], _Stream] = field(default_factory=dict)
    _last: dict[str, tuple[int, Record | None]] = field(default_factory=dict)
    _warned_dropout: bool = False
    _past: Past = field(default_factory=Past)
    _keys: KeyChecks = field(default_factory=KeyChecks)
    events: int = 0

    def __post_init__(self) -> None:
        self.builder = RecordBuilder(self.options, self.stager)

    def new_step(self, step: int) -> None:
        """Start step ``step``: call indices and KV streams start afresh."""
        self.step = step
        self._calls.clear()
        self._pass_first.clear()
        self._cursor.clear()
        self._streams.clear()
        self._continuing = self._rows = False
        self.dropping = False

    def begin_pass(self, continuation: bool, past: Past | None = None) -> None:
        """A forward starts; ``continuation`` when it extends the previous one's KV cache, ``past``
        what its cache held (the length, and the slot reorders since the last forward)."""
        self._continuing = continuation and bool(self._pass_first)
        self._past = past or Past()
        self._last.clear()
        # decode rows may take the short way (row): a continuation, told of no reorder, whose cache says its length
        self._rows = self._continuing and self._past.parents is None and self._past.length is not None
        self._rows = self._rows and self.builder.plain
        if self._continuing:
            self._cursor = dict(self._pass_first)
        else:
            self._pass_first = {}

    def take(self, owner: str, event: AttentionEvent, cross: bool | None) -> Record | None:
        """Build, check and keep the record of one attention call of ``owner``.

        Returns None when the step is being dropped (the store's writer fell behind and the
        capture was opened with ``when_full="drop"``).
        """
        self.events += 1
        self.seen.add(owner)
        if self.dropping:
            return None
        call, continues = self._call_index(owner)
        stream = self._streams.get((owner, call)) if continues else None
        if cross is None:
            cross = stream.cross if stream else looks_cross(event, self._past.length)
        event, q_offset, k_offset, shift = self._place(owner, call, stream, event, cross)
        counted = self.admit is not None or self.listener is not None  # in memory, nothing counts the bytes
        nbytes = self.builder.nbytes(event, k_offset - shift, shift) if counted else 0
        if self.admit is not None and not self.admit(nbytes):
            self.dropping = True
            return None
        rec = self.builder.build(owner, call, self.step, event, q_offset, k_offset, "cross" if cross else "self", shift)
        parents = self._past.parents if stream and not cross else None
        if parents is not None and rec.k is not None:
            rec.parents = key_parents(parents, int(rec.k.shape[2]))
        _, _, q_len, k_len = event.shape
        if stream is None:
            stream = self._streams[(owner, call)] = _Stream(q_offset + q_len, k_len + shift, cross)
        else:
            stream.rows, stream.keys, stream.cross, stream.tail = q_offset + q_len, k_len + shift, cross, None
        if not cross and event.k is not None and (self._continuing or self._past.length is not None):
            stream.tail = _tail(event.k, rec.k)  # a forward with a KV cache: the next one is checked against these
        if event.dropout > 0:
            self.dropout(owner, event.dropout, rec)
        self._keep(owner, call, rec, nbytes)
        return rec

    def row(
        self,
        owner: str,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        mask: MaskSpec,
        scale: float | None,
        source: str,
    ) -> bool:
        """:meth:`take` of a decode call with the least work (a few Python calls where :meth:`take` makes
        ~30: most of what a decode step's capture cost): ``q`` ``[batch, heads, 1, head_dim]``, one query row
        continuing a self-attention stream of this continuation forward whose cache grew by one key (``k``
        ``[batch, kv_heads, past + 1, head_dim]``), ``lse`` ``[batch, heads, 1]`` the kernel's (None when no
        record keeps it), no dropout. The record is the one :meth:`take` makes of the same call; False
        (nothing done) when the call is not that case (a crop, a reorder, a static or rolling cache, a
        record that keeps more, a new stream): then :meth:`take` records it."""
        call = self._cursor.get(owner) if self._rows else None
        if call is None:
            return False
        stream, held = self._streams.get((owner, call)), self._past.length
        if stream is None or stream.cross or held != stream.keys or self.dropping or q.shape[2] != 1:
            return False
        if k.shape[2] != held + 1 or (lse is None and self.builder.wants_lse):
            return False
        self.events += 1
        self.seen.add(owner)
        self._cursor[owner] = call + 1
        if stream.tail is not None:  # the kernel's key at position held - 1, as recorded?
            self._keys.queue((owner, self.step, call), stream.tail, k, held - 1, 0, None)
        rec = self.builder.row(owner, call, self.step, q, k, lse, mask, scale, source, stream.rows, held)
        nbytes = 0  # what builder.nbytes counts
        for t in (rec.q, rec.k, rec.lse):
            nbytes += 0 if t is None else t.nbytes
        if self.admit is not None and not self.admit(nbytes):
            self.dropping = True
            return True
        stream.rows, stream.keys, stream.tail = stream.rows + 1, held + 1, _tail(k, rec.k)
        self._keep(owner, call, rec, nbytes)
        return True

    def _keep(self, owner: str, call: int, rec: Record, nbytes: int) -> None:
        """Keep ``rec`` (in ``records`` with ``keep``) and hand it to the listener."""
        ready = self.stager.seal()
        if self.keep:
            self.records.append(rec)
        if self.listener is not None:
            self.listener.put(rec, nbytes, ready)
        self._last[owner] = (call, rec if self.keep else None)

    def _place(
        self, owner: str, call: int, stream: _Stream | None, event: AttentionEvent, cross: bool
    ) -> tuple[AttentionEvent, int, int, int]:
        """Where a call's rows and keys go in its stream: ``(event, q_offset, k_offset, shift)``, the
        event cut to the cache's written positions (a static buffer), ``shift`` the positions a rolling
        cache dropped before the kernel's first key. Checks the cache against the stream."""
        q_len, k_len = event.shape[2], event.shape[3]
        past = self._past.length
        if not cross and past is not None and k_len > past + q_len:
            event = unused_slots_removed(owner, event, past + q_len)  # a static cache's whole buffer
            k_len = past + q_len
        if stream is None:
            return event, 0, 0, 0
        if cross:
            return event, stream.rows, stream.keys if stream.keys <= k_len else 0, 0
        held = stream.keys if past is None else past  # positions in the cache before this forward
        if held > stream.keys or held < stream.keys - stream.rows:
            raise CacheMismatchError(
                f"{owner!r} (step {self.step}, call {call}): the forward's KV cache holds {held} positions but "
                f"the capture recorded {stream.keys} for this stream, so its keys cannot be placed; a cache "
                "filled outside the capture or by another model? Start the step afresh (a forward without the "
                "cache), or say where the forward continues with cap.continuing(past=n)."
            )
        if held < stream.keys:  # a cropped cache (rejected draft tokens): its rows are replaced
            self._refuse_crop(owner, call)
        shift = max(0, held + q_len - k_len)
        if stream.tail is not None and event.k is not None:  # the kernel's key at position held - 1, as recorded?
            where = (owner, self.step, call)
            self._keys.queue(where, stream.tail, event.k, held - shift - 1, stream.keys - held, self._past.parents)
        return event, stream.rows - (stream.keys - held), held, shift

    def crop(self, length: int) -> None:
        """The KV cache was cropped to ``length`` positions (assisted decoding rejected draft tokens):
        every self-attention stream of the step drops its rows and keys from there on, in
        ``records`` and in the store, so the rows kept are those of the accepted tokens."""
        for (owner, call), stream in self._streams.items():
            drop = stream.keys - length
            if stream.cross or drop <= 0:
                continue
            self._refuse_crop(owner, call)
            rows = max(0, stream.rows - drop)
            stream.rows, stream.keys = rows, length
            keep = 0 if stream.tail is None else stream.tail.shape[2] - drop
            stream.tail = stream.tail[:, :, :keep] if stream.tail is not None and keep > 0 else None
            if self.keep:
                cut_stream(self.records, (owner, self.step, call), rows, length)
            if self.listener is not None:
                self.listener.cut(owner, call, rows, length)

    def _refuse_crop(self, owner: str, call: int) -> None:
        if "summary" in self.options.record:
            raise CacheMismatchError(
                f"{owner!r} (step {self.step}, call {call}): the KV cache was cropped (rejected draft tokens), "
                "but record='summary' adds every row to running column sums that cannot take rows back; "
                "record ('q', 'k', 'lse') for assisted or speculative decoding and summarise the store afterwards"
            )

    def check(self) -> None:
        """Raise :class:`CacheMismatchError` when a forward's cache held keys other than those recorded
        (:class:`~attnhooks.capturing.kvcache.KeyChecks`, read once per forward)."""
        self._keys.settle()

    def dropout(self, owner: str, p: float, rec: Record | None = None) -> None:
        """Dropout ``p`` hit the probabilities of ``owner``'s last call: flag it or refuse."""
        if rec is not None:
            rec.dropout = p
        elif owner in self._last:
            call, kept = self._last[owner]
            if kept is not None:
                kept.dropout = p
            if self.listener is not None:
                self.listener.dropout(owner, call, p)
        else:
            return
        if self.options.dropout == "refuse":
            raise DropoutError(
                f"attention dropout p={p} is active in {owner!r} during capture, so the probabilities "
                "the model used were randomly zeroed. Call model.eval() or set the attention dropout "
                "to 0 for captured steps, or pass capture(..., dropout='flag') to record the "
                "pre-dropout probabilities with Record.dropout set."
            )
        if not self._warned_dropout:
            self._warned_dropout = True
            warnings.warn(
                f"attnhooks: attention dropout p={p} is active in {owner!r}; records hold the "
                "probabilities before dropout and have Record.dropout set. Use model.eval() for "
                "exact captures.",
                FaithfulnessWarning,
                stacklevel=4,
            )

    def _call_index(self, owner: str) -> tuple[int, bool]:
        if self._continuing and owner in self._cursor:
            call = self._cursor[owner]
            self._cursor[owner] = call + 1
            return call, True
        call = self._calls.get(owner, 0)
        self._calls[owner] = call + 1
        if not self._continuing:
            self._pass_first.setdefault(owner, call)
        return call, False
