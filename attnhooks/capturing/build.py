"""Records built from attention events: the probabilities, lse and reductions a call keeps, staged
off the hot path, in stream positions (a rolling cache's dropped keys shifted in), with the optional
faithfulness check against the kernel's output."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import torch

from attnhooks.attention.kernels import attention_probs, isolated, logsumexp, row_lse, verify_rows
from attnhooks.attention.masks import MaskSpec, unmasked
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.record import Record
from attnhooks.capturing.staging import Stager, detached
from attnhooks.errors import FaithfulnessWarning
from attnhooks.reduce.summary import SummaryOptions, summarize_call

__all__ = ["RECORDABLE", "RecordBuilder", "RecordOptions", "row_windows", "shifted"]

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


@dataclass
class RecordBuilder:
    """Builds the :class:`Record` of one call as ``options`` say, staging its tensors with ``stager``."""

    options: RecordOptions
    stager: Stager

    def __post_init__(self) -> None:
        want = self.options.record
        self._q, self._k, self._attn, self._lse = "q" in want, "k" in want, "attn" in want, "lse" in want
        self._summary = "summary" in want
        self.wants_lse = self._lse or self._summary  # the row log-sum-exp is needed
        # only q, k and lse kept, nothing checked: a decode call's record is made without an event (row)
        self.plain = not (self._attn or self._summary or self.options.verify)

    def nbytes(self, event: AttentionEvent, k_new: int, shift: int) -> int:
        """Host bytes the record of ``event`` will hold (what a store's budget must admit); its new
        keys start at the kernel's key ``k_new``."""
        b, h, q_len, k_len = event.shape
        total = 0
        q, k = event.q, event.k
        if self._q and q is not None:
            total += q.numel() * q.element_size()
        if self._k and k is not None:
            kb, kh, kn, kd = k.shape
            total += kb * kh * max(0, kn - k_new if k_new >= 0 else min(kn, -k_new)) * kd * k.element_size()
        if self._attn:
            total += b * h * q_len * (k_len + shift) * 4
        if self._lse:
            total += b * h * q_len * 4
        if self._summary:
            s = self.options.summary
            total += b * h * (q_len * (2 + 2 * s.topk + s.band) + k_len + shift + 2 * s.pooled**2) * 4
        return total

    def build(
        self,
        owner: str,
        call: int,
        step: int,
        event: AttentionEvent,
        q_offset: int,
        k_offset: int,
        kind: str,
        shift: int,
    ) -> Record:
        """The record of one call. Its attn, lse and mask are computed over the kernel's keys, then
        moved ``shift`` positions right when a rolling cache dropped that many keys."""
        q, k = event.q, event.k
        rec = Record(
            module=owner,
            call=call,
            step=step,
            q_offset=q_offset,
            k_offset=k_offset,
            k_len=event.shape[3] + shift,
            kind=kind,
            source=event.source,
            scale=event.scale if event.scale is not None else _default_scale(q),
            mask=event.mask or unmasked(),
            softcap=event.softcap or None,
        )
        if self._q and q is not None:
            rec.q = self.stager.stage(q)
        if self._k and k is not None:
            rec.k = self.stager.stage_keys(k, k_offset - shift)
        attn = None
        lse = None
        if event.attn is not None and event.scores is not None:
            attn, lse = self._from_eager(rec, event, shift)
        elif event.attn is not None:  # probabilities given without scores (attnhooks.emit)
            attn = event.attn.detach()
            if self._attn:
                rec.attn = self._stage_attn(attn, shift, rec)
        elif self._attn and q is not None and k is not None:
            windows = row_windows(self.options.rows, rec, event.shape[2])
            if windows is None:
                with_lse = self.wants_lse and event.lse is None
                into = self.stager.empty(event.shape, torch.float32, q.device)
                attn, lse = attention_probs(
                    q, k, rec.scale, rec.mask, softcap=event.softcap, with_lse=with_lse, out=into
                )
                rec.attn = self._stage_attn(attn, shift, ours=True)
            elif windows:  # only the chosen rows: never the whole matrix
                parts = [
                    attention_probs(q, k, rec.scale, rec.mask, slice(a, b), event.softcap, with_lse=False)[0]
                    for a, b in windows
                ]
                rec.attn, rec.attn_rows = self._stage_attn(torch.cat(parts, dim=2), shift, ours=True), windows
        if self.wants_lse and q is not None and k is not None:
            if lse is None:  # the kernel's, or computed block by block (no n x n matrix)
                kernel = event.lse
                lse = detached(kernel) if kernel is not None else row_lse(q, k, rec.scale, rec.mask, event.softcap)
            if self._lse and rec.lse is None:
                rec.lse = self.stager.stage(lse, owned=True)
            if self._summary:
                rec.summary = self._summary_of(rec, event, lse, shift)
        if self.options.verify and event.v is not None and event.out is not None and q is not None and k is not None:
            self._verify(rec, event, attn if self._attn else None)
        if shift:
            rec.mask = shifted(rec.mask, shift, event.shape)
        return rec

    def row(
        self,
        owner: str,
        call: int,
        step: int,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        mask: MaskSpec,
        scale: float | None,
        source: str,
        q_offset: int,
        held: int,
    ) -> Record:
        """The record :meth:`build` makes of a decode call (one query row ``q``, keys ``k`` of ``held + 1``
        positions, the kernel's ``lse``) when the options are :attr:`plain`: without an event."""
        scale = scale if scale is not None else _default_scale(q)
        kept_q = self.stager.stage(q) if self._q else None
        kept_k = self.stager.stage_keys(k, held) if self._k else None
        kept_lse = self.stager.stage(lse, owned=True) if self._lse and lse is not None else None
        # by position (half the cost of keywords; a test compares the record with build's, field by field): q, k,
        # attn, lse, scale, mask, softcap, q_offset, k_offset, k_len, kind, source
        return Record(
            owner,
            call,
            step,
            kept_q,
            kept_k,
            None,
            kept_lse,
            scale,
            mask,
            None,
            q_offset,
            held,
            held + 1,
            "self",
            source,
        )

    def _summary_of(self, rec: Record, event: AttentionEvent, lse: torch.Tensor, shift: int) -> dict[str, torch.Tensor]:
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

    def _stage_attn(
        self, attn: torch.Tensor, shift: int, rec: Record | None = None, ours: bool = False
    ) -> torch.Tensor:
        """Stage probabilities over the kernel's keys, with ``shift`` zero columns before them; with
        ``rec`` and row windows, only the chosen rows (``rec.attn_rows`` set). ``ours``: attnhooks
        computed ``attn`` (nobody else holds it), so on the CPU it is kept without a copy."""
        if rec is not None:
            windows = row_windows(self.options.rows, rec, int(attn.shape[2]))
            if windows is not None:
                rec.attn_rows = windows
                # (a decode row outside every window keeps no row: an empty block, not a failed cat)
                attn = torch.cat([attn[:, :, a:b] for a, b in windows], dim=2) if windows else attn[:, :, :0]
        if shift:
            with isolated(attn.device):
                return self.stager.stage(torch.nn.functional.pad(attn.float(), (shift, 0)), owned=True)
        return self.stager.stage(attn.float(), owned=ours or attn.dtype != torch.float32)

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


def row_windows(rows: tuple[slice, ...] | None, rec: Record, q_len: int) -> tuple[tuple[int, int], ...] | None:
    """The rows of this record (relative) that ``rows`` (the ``rows=`` option) keeps, merged and in order; None: all."""
    if rows is None:
        return None
    first, end = rec.q_offset, rec.q_offset + q_len
    spans = []
    for window in rows:
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
