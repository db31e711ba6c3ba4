"""Recorder: turns attention events into Records, per step, call and KV-cache stream.

Call indices: within a step, the n-th call of a module gets index n. A *continuation* forward
(a KV-cache decode step or a chunk of a chunked prefill) does not open new calls: its n-th call of
a module continues the n-th call of that module in the forward it continues, and the record keeps
only the new query rows and the keys not recorded before, so a generation of N tokens keeps
O(N·d) of q and k.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from attnhooks.attention.kernels import attention_probs, isolated, logsumexp, row_lse, verify_rows
from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.kvcache import Past
from attnhooks.capturing.record import Record
from attnhooks.capturing.staging import Stager
from attnhooks.capturing.streams import cut, rows_of
from attnhooks.errors import CacheMismatchError, DropoutError, FaithfulnessWarning
from attnhooks.reduce.summary import SummaryOptions, summarize_call

__all__ = ["Listener", "RecordOptions", "Recorder"]

RECORDABLE = ("attn", "q", "k", "lse", "summary")


@dataclass(frozen=True)
class RecordOptions:
    """What a capture keeps of each call and how it checks it.

    Attributes:
        record: subset of ``("attn", "q", "k", "lse", "summary")``.
        verify: number of query rows per call whose ``attn @ v`` is compared with the kernel's
            output (0 = off).
        dropout: ``"flag"`` (record, set ``Record.dropout``, warn once) or ``"refuse"`` (raise).
        summary: sizes of the ``"summary"`` reductions.
        rows: query rows whose ``attn`` is kept (stream positions; negative: from the end of each
            forward call); None keeps every row.
    """

    record: frozenset[str]
    verify: int = 0
    dropout: str = "flag"
    summary: SummaryOptions = field(default_factory=SummaryOptions)
    rows: tuple[slice, ...] | None = None


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
    tail: torch.Tensor | None = None  # its last keys [batch, kv_heads, <= _TAIL, head_dim], positions up to `keys`


@dataclass
class Recorder:
    """Per-step call bookkeeping and record construction for one capture."""

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
    _streams: dict[tuple[str, int], _Stream] = field(default_factory=dict)
    _last: dict[str, tuple[int, Record | None]] = field(default_factory=dict)
    _warned_dropout: bool = False
    _past: Past = field(default_factory=Past)
    _checks: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    events: int = 0

    def new_step(self, step: int) -> None:
        """Start step ``step``: call indices and KV streams start afresh."""
        self.step = step
        self._calls.clear()
        self._pass_first.clear()
        self._cursor.clear()
        self._streams.clear()
        self._continuing = False
        self.dropping = False

    def begin_pass(self, continuation: bool, past: Past | None = None) -> None:
        """A forward starts; ``continuation`` when it extends the previous one's KV cache, ``past``
        what its cache held (the length, and the slot reorders since the last forward)."""
        self._continuing = continuation and bool(self._pass_first)
        self._past = past or Past()
        self._last.clear()
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
            cross = stream.cross if stream else _looks_cross(event, self._past.length)
        event, q_offset, k_offset, shift = self._place(owner, call, stream, event, cross)
        nbytes = self._nbytes(event, k_offset - shift, shift)
        if self.admit is not None and not self.admit(nbytes):
            self.dropping = True
            return None
        rec = self._build(owner, call, event, q_offset, k_offset, "cross" if cross else "self", shift)
        parents = self._past.parents if stream and not cross else None
        if parents is not None and rec.k is not None:
            rec.parents = _key_parents(parents, int(rec.k.shape[2]))
        self._streams[(owner, call)] = _Stream(q_offset + event.shape[2], event.shape[3] + shift, cross)
        if not cross and event.k is not None and (self._continuing or self._past.length is not None):
            with torch._C.DisableTorchFunction():  # a forward with a KV cache: the next one is checked against these
                self._streams[(owner, call)].tail = event.k.detach()[:, :, -_TAIL:].clone()
        if event.dropout > 0:
            self.dropout(owner, event.dropout, rec)
        ready = self.stager.seal()
        if self.keep:
            self.records.append(rec)
        if self.listener is not None:
            self.listener.put(rec, nbytes, ready)
        self._last[owner] = (call, rec if self.keep else None)
        return rec

    def _place(
        self, owner: str, call: int, stream: _Stream | None, event: AttentionEvent, cross: bool
    ) -> tuple[AttentionEvent, int, int, int]:
        """Where a call's rows and keys go in its stream: ``(event, q_offset, k_offset, shift)``, the
        event cut to the cache's written positions (a static buffer), ``shift`` the positions a rolling
        cache dropped before the kernel's first key. Checks the cache against the stream."""
        q_len, k_len = event.shape[2], event.shape[3]
        past = self._past.length
        if not cross and past is not None and k_len > past + q_len:
            event = _unused_slots_removed(owner, event, past + q_len)  # a static cache's whole buffer
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
        self._check_keys(owner, call, stream, event, held, shift, self._past.parents)
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
                self._cut_records(owner, call, rows, length)
            if self.listener is not None:
                self.listener.cut(owner, call, rows, length)

    def _refuse_crop(self, owner: str, call: int) -> None:
        if "summary" in self.options.record:
            raise CacheMismatchError(
                f"{owner!r} (step {self.step}, call {call}): the KV cache was cropped (rejected draft tokens), "
                "but record='summary' adds every row to running column sums that cannot take rows back; "
                "record ('q', 'k', 'lse') for assisted or speculative decoding and summarise the store afterwards"
            )

    def _cut_records(self, owner: str, call: int, rows: int, keys: int) -> None:
        """Cut the kept records of a stream to its first ``rows`` rows and ``keys`` keys."""
        for i in range(len(self.records) - 1, -1, -1):
            rec = self.records[i]
            if rec.step != self.step:
                break
            if rec.module != owner or rec.call != call:
                continue
            if rec.q_offset >= rows and rec.q_offset > 0:
                del self.records[i]
            elif rec.q_offset + rows_of(rec) > rows:
                self.records[i] = cut(rec, rows - rec.q_offset, keys)
            else:
                break

    def check(self) -> None:
        """Raise :class:`CacheMismatchError` when a forward's cache held keys other than those recorded
        (checked on the device during the forward; read here, once per forward, to keep the hot path
        free of host synchronisation)."""
        checks, self._checks = self._checks, []
        for owner, call, differs in checks:
            if bool(differs):
                raise CacheMismatchError(
                    f"{owner!r} (step {self.step}, call {call}): the keys in the forward's KV cache differ from "
                    "the keys the capture recorded for this stream: the cache was changed between forwards in a "
                    "way attnhooks was not told (reordered or edited by hand?). Reorder it with the cache's "
                    "reorder_cache(beam_idx), or start a new step (a forward without the cache)."
                )

    def _check_keys(
        self,
        owner: str,
        call: int,
        stream: _Stream,
        event: AttentionEvent,
        held: int,
        shift: int,
        parents: torch.Tensor | None,
    ) -> None:
        """Queue the comparison of the kernel's key at position ``held - 1`` (the last one the cache held
        before this forward) with the key recorded there, slot by slot: a reorder or crop the capture
        was not told of, or keys edited by hand, make them differ (in some layer)."""
        tail, k = stream.tail, event.k
        if tail is None or k is None:
            return
        if parents is not None:
            if parents.numel() != tail.shape[0] or int(parents.max()) >= tail.shape[0]:
                raise CacheMismatchError(
                    f"{owner!r} (step {self.step}, call {call}): the cache was reordered with {parents.numel()} "
                    f"slots but the stream has {tail.shape[0]}"
                )
            tail = tail[parents.to(tail.device)]
        last = tail.shape[2] - (stream.keys - held) - 1  # the tail's index of position `held - 1`
        if last < 0 or held - shift < 1:
            return  # cropped past the tail, or a rolling cache kept no earlier key: only the counts are checked
        with torch._C.DisableTorchFunction():  # our own ops: no mode sees them
            new, old = k.select(2, held - shift - 1), tail.select(2, last)
            if new.device.type == "cpu":  # checked at once; a device is checked once per forward (no sync here)
                if not torch.equal(new, old):
                    self._checks.append((owner, call, torch.ones((), dtype=torch.bool)))
            elif new.shape != old.shape:
                self._checks.append((owner, call, torch.ones((), dtype=torch.bool)))
            else:
                self._checks.append((owner, call, (new != old).any()))

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

    def _nbytes(self, event: AttentionEvent, k_new: int, shift: int) -> int:
        """Host bytes the record of ``event`` will hold (what a store's budget must admit); its new
        keys start at the kernel's key ``k_new``."""
        want = self.options.record
        b, h, q_len, k_len = event.shape
        total = 0
        if "q" in want and event.q is not None:
            total += event.q.numel() * event.q.element_size()
        if "k" in want and event.k is not None:
            total += event.k[:, :, k_new:].numel() * event.k.element_size()
        if "attn" in want:
            total += b * h * q_len * (k_len + shift) * 4
        if "lse" in want:
            total += b * h * q_len * 4
        if "summary" in want:
            s = self.options.summary
            total += b * h * (q_len * (2 + 2 * s.topk + s.band) + k_len + shift + 2 * s.pooled**2) * 4
        return total

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

    def _build(
        self, owner: str, call: int, event: AttentionEvent, q_offset: int, k_offset: int, kind: str, shift: int
    ) -> Record:
        """The record of one call. Its attn, lse and mask are computed over the kernel's keys, then
        moved ``shift`` positions right when a rolling cache dropped that many keys."""
        want = self.options.record
        q, k = event.q, event.k
        rec = Record(
            module=owner,
            call=call,
            step=self.step,
            q_offset=q_offset,
            k_offset=k_offset,
            k_len=event.shape[3] + shift,
            kind=kind,
            source=event.source,
            scale=event.scale if event.scale is not None else _default_scale(q),
            mask=event.mask or MaskSpec(),
            softcap=event.softcap or None,
        )
        if "q" in want and q is not None:
            rec.q = self.stager.stage(q)
        if "k" in want and k is not None:
            rec.k = self.stager.stage(k[:, :, k_offset - shift :])
        attn = None
        lse = None
        if event.attn is not None and event.scores is not None:
            attn, lse = self._from_eager(rec, event, shift)
        elif event.attn is not None:  # probabilities given without scores (attnhooks.emit)
            attn = event.attn.detach()
            if "attn" in want:
                rec.attn = self._stage_attn(attn, shift, rec)
        elif "attn" in want and q is not None and k is not None:
            windows = self._windows(rec, event.shape[2])
            if windows is None:
                with_lse = bool({"lse", "summary"} & want) and event.lse is None
                attn, lse = attention_probs(q, k, rec.scale, rec.mask, softcap=event.softcap, with_lse=with_lse)
                rec.attn = self._stage_attn(attn, shift)
            elif windows:  # only the chosen rows: never the whole matrix
                parts = [
                    attention_probs(q, k, rec.scale, rec.mask, slice(a, b), event.softcap, with_lse=False)[0]
                    for a, b in windows
                ]
                rec.attn, rec.attn_rows = self._stage_attn(torch.cat(parts, dim=2), shift), windows
        if {"lse", "summary"} & want and q is not None and k is not None:
            if lse is None:  # the kernel's, or computed block by block (no n x n matrix)
                lse = event.lse.detach() if event.lse is not None else row_lse(q, k, rec.scale, rec.mask, event.softcap)
            if "lse" in want and rec.lse is None:
                rec.lse = self.stager.stage(lse, owned=True)
            if "summary" in want:
                rec.summary = self._summary(rec, event, lse, shift)
        if self.options.verify and event.v is not None and event.out is not None and q is not None and k is not None:
            self._verify(rec, event, attn if "attn" in want else None)
        if shift:
            rec.mask = shifted(rec.mask, shift, event.shape)
        return rec

    def _summary(self, rec: Record, event: AttentionEvent, lse: torch.Tensor, shift: int) -> dict[str, torch.Tensor]:
        """The call's reductions, staged; in stream positions when a rolling cache dropped keys.
        A continuation adds its rows (and its column sums); the overview map is the first call's."""
        assert event.q is not None and event.k is not None
        q_len, k_len = event.shape[2], event.shape[3]
        mask = rec.mask
        q_start = mask.offset if mask.dense is None and mask.causal else max(0, k_len - q_len)
        out = summarize_call(
            event.q,
            event.k,
            lse,
            scale=rec.scale,
            mask=mask,
            softcap=event.softcap,
            q_start=q_start,
            key_start=shift,
            options=replace(self.options.summary, pooled=0) if rec.q_offset else self.options.summary,
        )
        if shift:
            if "topk_index" in out:
                out["topk_index"] += shift
            out["received"] = torch.nn.functional.pad(out["received"], (shift, 0))
        return {name: self.stager.stage(t, owned=True) for name, t in out.items()}

    def _windows(self, rec: Record, q_len: int) -> tuple[tuple[int, int], ...] | None:
        """The rows of this record (relative) that ``rows=`` keeps, merged and in order; None: all."""
        if self.options.rows is None:
            return None
        first, end = rec.q_offset, rec.q_offset + q_len
        spans = []
        for window in self.options.rows:
            start = 0 if window.start is None else window.start
            stop = end if window.stop is None else window.stop
            start, stop = (end + start if start < 0 else start), (end + stop if stop < 0 else stop)
            a, b = max(start, first) - first, min(stop, end) - first
            if a < b:
                spans.append((a, b))
        merged: list[tuple[int, int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return tuple(merged)

    def _stage_attn(self, attn: torch.Tensor, shift: int, rec: Record | None = None) -> torch.Tensor:
        """Stage probabilities over the kernel's keys, with ``shift`` zero columns before them; with
        ``rec`` and row windows, only the chosen rows (``rec.attn_rows`` set)."""
        if rec is not None:
            windows = self._windows(rec, int(attn.shape[2]))
            if windows is not None:
                rec.attn_rows = windows
                attn = torch.cat([attn[:, :, a:b] for a, b in windows], dim=2)
        if shift:
            with isolated(attn.device):
                return self.stager.stage(torch.nn.functional.pad(attn.float(), (shift, 0)), owned=True)
        return self.stager.stage(attn.float(), owned=attn.dtype != torch.float32)

    def _from_eager(self, rec: Record, event: AttentionEvent, shift: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities the model materialised and, when wanted, their lse; scale and mask
        inferred from its scores."""
        assert event.attn is not None and event.scores is not None
        attn = event.attn.detach()
        lse = None
        with isolated(attn.device):
            if "attn" in self.options.record:
                rec.attn = self._stage_attn(attn, shift, rec)
            if {"lse", "summary"} & self.options.record:
                lse = logsumexp(event.scores.float())
            if event.q is not None and event.k is not None:
                raw = torch.matmul(event.q.float(), event.k.float().transpose(-1, -2))
                rec.scale, rec.mask = _eager_scale_and_mask(raw, event.scores)
        return attn, lse

    def _verify(self, rec: Record, event: AttentionEvent, attn: torch.Tensor | None) -> None:
        assert event.q is not None and event.k is not None and event.v is not None and event.out is not None
        q_len = event.q.shape[2]
        if q_len == 0 or event.k.shape[2] == 0:
            return
        rows = torch.unique(torch.linspace(0, q_len - 1, min(self.options.verify, q_len)).round().long())
        with isolated(event.q.device):
            if attn is not None:  # already computed over every key: check what is kept
                attn = attn[:, :, rows.to(attn.device)].float()
            else:
                attn = torch.cat(
                    [
                        attention_probs(
                            event.q, event.k, rec.scale, rec.mask, slice(r, r + 1), event.softcap, with_lse=False
                        )[0]
                        for r in rows.tolist()
                    ],
                    dim=2,
                )
            err = verify_rows(attn, event.v, event.out[:, :, rows.to(event.out.device)], event.project)
        rec.verify_error = err
        tolerance = 1e-4 if event.q.dtype in (torch.float32, torch.float64) else 5e-2
        if not err <= tolerance:
            warnings.warn(
                f"attnhooks: captured attention of {rec.module!r} (step {rec.step}, call {rec.call}, "
                f"{rec.source}) does not reproduce the kernel's output: max |attn @ v - out| = {err:.3g} "
                f"> {tolerance:g}. Please report it with the model class.",
                FaithfulnessWarning,
                stacklevel=4,
            )


def shifted(mask: MaskSpec, shift: int, shape: tuple[int, int, int, int]) -> MaskSpec:
    """The kernel's ``mask`` over the last ``k_len`` of ``k_len + shift`` stream keys, in stream
    positions: the ``shift`` keys a rolling cache dropped are hidden."""
    batch, _, q_len, k_len = shape
    if mask.dense is None and q_len == 1:  # one decode row: it sees (some of) the kernel's keys
        key_valid = None if mask.key_valid is None else torch.nn.functional.pad(mask.key_valid, (shift, 0), value=True)
        window = k_len if mask.window is None else min(mask.window, k_len)
        return MaskSpec(causal=True, offset=k_len - 1 + shift, window=window, key_valid=key_valid)
    additive = mask.additive(batch, q_len, k_len)
    if additive is None:
        additive = torch.zeros(1, 1, q_len, k_len)
    return MaskSpec(dense=torch.nn.functional.pad(additive.cpu(), (shift, 0), value=-math.inf))


def _looks_cross(event: AttentionEvent, past: int | None) -> bool:
    """A call of a new stream attends over another sequence's keys (cross-attention): its keys are
    not the forward's own positions (``past + q_len`` of them, or a static buffer's hidden tail)."""
    _, _, q_len, k_len = event.shape
    if past is None:
        return q_len != k_len
    if k_len == past + q_len:
        return False
    return not (k_len > past + q_len and _hides_keys_from(event, past + q_len))


def _hides_keys_from(event: AttentionEvent, n: int) -> bool:
    """True when the call hides every key from ``n`` on from every query row: by its mask, or in an
    eager call by its scores (``-inf``, or transformers' ``finfo.min``)."""
    q_len, k_len = event.shape[2:]
    if event.scores is not None:
        tail = event.scores[..., n:].detach()
        return bool((tail <= torch.finfo(tail.dtype).min / 2).all())
    return (event.mask or MaskSpec()).hides_keys_from(n, q_len, k_len)


def _unused_slots_removed(owner: str, event: AttentionEvent, n: int) -> AttentionEvent:
    """The call over its first ``n`` keys only: a static cache hands the kernel its whole buffer, whose
    slots past the written positions the mask hides. Raises when the mask does not hide them."""
    if not _hides_keys_from(event, n):
        raise CacheMismatchError(
            f"{owner!r}: the kernel received {event.shape[3]} keys but the forward's cache holds only {n} positions "
            "(with this call's), and the mask does not hide the rest; the cache's length does not describe its keys"
        )

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[..., :n]

    return replace(
        event,
        k=None if event.k is None else event.k[:, :, :n],
        v=None if event.v is None else event.v[:, :, :n],
        attn=first(event.attn),
        scores=first(event.scores),
        # (an eager call's mask is read from its scores later)
        mask=None if event.mask is None else event.mask.first_keys(n, event.shape[2], event.shape[3]),
    )


def _key_parents(parents: torch.Tensor, k_new: int) -> torch.Tensor:
    """``[batch, k_new]``: the slot preceding each new key; the first new key follows the reorder."""
    batch = parents.numel()
    out = torch.arange(batch, dtype=torch.int64)[:, None].repeat(1, k_new)
    if k_new:
        out[:, 0] = parents
    return out


def _default_scale(q: torch.Tensor | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if q is not None else 1.0


def _eager_scale_and_mask(raw: torch.Tensor, scores: torch.Tensor) -> tuple[float, MaskSpec]:
    """``scores = raw * scale + residual``: the scale when one fits, the residual as the mask.

    A residual of 0 / -inf becomes a compact mask; anything else is kept dense (with scale 1.0
    when no scale fits: T5's position bias, ALiBi), so ``q·kᵀ·scale + mask`` reproduces the scores.
    Masked scores filled with ``finfo.min`` (transformers' eager masks) stay ``finfo.min``: a
    fully masked row is then uniform, as the model's softmax made it. A residual shared by all heads
    is kept once (``[batch, 1, q_len, k_len]``).
    """
    raw, scores = raw.detach().float(), scores.detach().float()
    floor = torch.finfo(torch.float32).min / 2
    masked = ~torch.isfinite(scores) | (scores <= floor)
    ok = ~masked & (raw.abs() > 1e-6)
    scale = 1.0
    if bool(ok.any()):
        ratios = (scores[ok] / raw[ok]).flatten()[:4096]
        candidate = float(ratios.median())
        if torch.allclose(scores[ok], raw[ok] * candidate, rtol=1e-4, atol=1e-5):
            scale = candidate
    residual = torch.where(masked, scores, scores - raw * scale)
    residual = residual.masked_fill(~masked & (residual.abs() < 1e-5), 0.0)
    if residual.dim() == 4 and residual.shape[1] > 1 and torch.equal(residual, residual[:, :1].expand_as(residual)):
        residual = residual[:, :1]
    return scale, MaskSpec.from_kernel(residual, False, scores.shape[-2], scores.shape[-1])
