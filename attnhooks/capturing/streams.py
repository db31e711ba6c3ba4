"""Reassemble a call stream (a prefill and its KV-cache continuations) into one record."""

from __future__ import annotations

import dataclasses

import torch

from attnhooks.capturing.record import Record
from attnhooks.errors import CacheMismatchError, ModuleSelectionError
from attnhooks.schema import ROWWISE

__all__ = ["assemble", "cut", "cut_stream", "join", "rows_of"]


def assemble(records: list[Record], module: str, step: int, call: int = 0) -> Record:
    """Join the records of one call stream into a single record over all its rows.

    Args:
        records: records of a capture (``cap.records``).
        module, step, call: which stream.

    Returns:
        A record whose ``q`` holds every query row (``[batch, heads, rows, head_dim]``), ``k`` every
        key, ``attn`` ``[batch, heads, rows, k_len]`` with zeros where a row's call had fewer keys
        (those keys did not exist yet: exactly the causal zeros of the full matrix), ``lse`` every row,
        ``parents`` the slot preceding each key when the cache's slots were reordered (beam search).
        Rows a later part replaced (the rejected draft tokens of assisted decoding, whose cache was
        cropped) are left out.

    Raises:
        ModuleSelectionError: no record matches.
    """
    parts = _current([r for r in records if r.module == module and r.step == step and r.call == call])
    if not parts:
        known = sorted({(r.module, r.step, r.call) for r in records})[:10]
        raise ModuleSelectionError(
            f"no records for module={module!r}, step={step}, call={call}; captured streams include {known}"
        )
    return join(parts)


def join(parts: list[Record]) -> Record:
    """One record for consecutive parts of a stream (ordered by ``q_offset``): q, k and lse
    concatenated, ``attn`` zero-padded to the last part's keys (with row windows: the windows'
    rows, listed in ``attn_rows``); other fields from the first part (the mask too), ``k_len`` and
    ``dropout`` the largest."""
    first = parts[0]
    if len(parts) == 1:
        return first
    out = dataclasses.replace(
        first,
        k_len=max(r.k_len for r in parts),
        dropout=max(r.dropout for r in parts),
        verify_error=None,
    )
    out.q = _cat([r.q for r in parts], dim=2)
    out.k = _cat([r.k for r in parts], dim=2)
    out.lse = _cat([r.lse for r in parts], dim=2)
    out.parents = _join_parents(parts)
    out.summary = _join_summary(parts, out.k_len)
    out.attn, out.attn_rows = _join_attn(parts, out.k_len)
    return out


def _current(parts: list[Record]) -> list[Record]:
    """The parts of one stream in capture order, each cut where a later part restarts the stream
    (a KV cache cropped between forwards): the rows and keys in force at the end."""
    out: list[Record] = []
    for part in parts:
        while out and out[-1].q_offset >= part.q_offset and part.q_offset > 0:
            out.pop()
        if part.q_offset == 0:
            out = []
        elif out and out[-1].q_offset + rows_of(out[-1]) > part.q_offset:
            out[-1] = cut(out[-1], part.q_offset - out[-1].q_offset, part.k_offset)
        out.append(part)
    return out


def cut_stream(records: list[Record], stream: tuple[str, int, int], rows: int, keys: int) -> None:
    """Cut the records of ``stream`` (``(module, step, call)``, the last step of ``records``) to its first
    ``rows`` rows and ``keys`` keys, in place (a cropped KV cache)."""
    owner, step, call = stream
    for i in range(len(records) - 1, -1, -1):
        rec = records[i]
        if rec.step != step:
            break
        if rec.module != owner or rec.call != call:
            continue
        if rec.q_offset >= rows and rec.q_offset > 0:
            del records[i]
        elif rec.q_offset + rows_of(rec) > rows:
            records[i] = cut(rec, rows - rec.q_offset, keys)
        else:
            break


def rows_of(rec: Record) -> int:
    """Query rows of a record."""
    for t in (rec.q, rec.lse, None if rec.attn_rows else rec.attn):
        if t is not None:
            return int(t.shape[2])
    return 0


def cut(rec: Record, rows: int, keys: int) -> Record:
    """``rec`` with its first ``rows`` query rows and its keys before stream position ``keys``."""
    if rec.attn_rows is not None or rec.summary is not None:
        raise CacheMismatchError(
            f"{rec.module!r}: a cropped KV-cache stream cannot be joined with row windows or summaries; "
            "read its records one by one"
        )
    k_new = max(0, keys - rec.k_offset)
    out = dataclasses.replace(rec, k_len=min(rec.k_len, keys))
    out.q = None if rec.q is None else rec.q[:, :, :rows]
    out.k = None if rec.k is None else rec.k[:, :, :k_new]
    out.lse = None if rec.lse is None else rec.lse[:, :, :rows]
    out.attn = None if rec.attn is None else rec.attn[:, :, :rows, : out.k_len]
    out.parents = None if rec.parents is None else rec.parents[:, :k_new]
    return out


def _join_parents(parts: list[Record]) -> torch.Tensor | None:
    """The parts' ``parents`` along their keys (a part without any: each slot precedes itself)."""
    if all(r.parents is None for r in parts) or any(r.k is None for r in parts):
        return None
    blocks = []
    for r in parts:
        assert r.k is not None
        batch, k_new = int(r.k.shape[0]), int(r.k.shape[2])
        own = torch.arange(batch, dtype=torch.int64)[:, None].expand(batch, k_new)
        blocks.append(own if r.parents is None else r.parents)
    return torch.cat(blocks, dim=1)


def _join_attn(parts: list[Record], k_len: int) -> tuple[torch.Tensor | None, tuple[tuple[int, int], ...] | None]:
    """The parts' ``attn`` rows in order, zero-padded to ``k_len`` keys, and the rows they are
    (None: every row); a part without ``attn`` (no row of it in a window) adds none."""
    if all(r.attn is None for r in parts):
        return None, None
    first = parts[0].q_offset
    spans: list[tuple[int, int]] = []
    blocks = []
    for r in parts:
        if r.attn is None:
            continue
        row = r.q_offset - first
        for a, b in r.attn_rows or ((0, int(r.attn.shape[2])),):
            if spans and spans[-1][1] == row + a:
                spans[-1] = (spans[-1][0], row + b)
            else:
                spans.append((row + a, row + b))
        blocks.append(torch.nn.functional.pad(r.attn.float(), (0, k_len - int(r.attn.shape[3]))))
    whole = all(r.attn is not None and r.attn_rows is None for r in parts)
    return torch.cat(blocks, dim=2), None if whole else tuple(spans)


def _join_summary(parts: list[Record], k_len: int) -> dict[str, torch.Tensor] | None:
    """Row reductions concatenated, column sums added up, the overview map of the first part."""
    if any(r.summary is None for r in parts):
        return None
    summaries = [r.summary for r in parts if r.summary is not None]
    out = {name: t for name, t in summaries[0].items() if name.startswith("pooled")}
    for name in ROWWISE:
        if name in summaries[0]:
            out[name] = torch.cat([s[name] for s in summaries], dim=2)
    received = [s["received"] for s in summaries]
    total = torch.zeros(*received[0].shape[:-1], k_len, dtype=torch.float64)
    for r in received:
        total[..., : r.shape[-1]] += r
    out["received"] = total.float()
    return out


def _cat(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat([t for t in tensors if t is not None], dim=dim)


# -- merging the continuation records of a stream into slabs (the store writer writes each as one) --
__all__ += ["batch_of", "follows", "join_run", "merge_contiguous", "row_count"]


def merge_contiguous(parts: list[Record]) -> list[Record]:
    """Join consecutive continuation records whose rows and keys follow each other into one.

    Args:
        parts: continuation records of one call stream, in capture order.

    Returns:
        The same rows and keys in fewer records: each run of parts that :func:`follows` its
        predecessor becomes one record (:func:`join_run`); the others stay as they are.
    """
    out: list[Record] = []
    run: list[Record] = []
    last: _Edges | None = None
    for part in parts:
        edges = _edges(part)  # (once a part: each is compared as the next and as the last)
        if last is not None and not _meet(last, edges):
            out.append(join_run(run))
            run = []
        run.append(part)
        last = edges
    if run:
        out.append(join_run(run))
    return out


def follows(prev: Record, part: Record) -> bool:
    """Whether ``part`` continues ``prev`` directly and the two can be one record: its rows and keys
    start where ``prev``'s end, neither has row windows or a dense mask, and their batches match."""
    return _meet(_edges(prev), _edges(part))


# (first row, row after the last, first key, key after the last (None: no keys), batch, can be joined)
_Edges = tuple[int, int, int, int | None, int, bool]


def _edges(rec: Record) -> _Edges:
    keys = None if rec.k is None else rec.k_offset + int(rec.k.shape[2])
    joinable = rec.attn_rows is None and rec.mask.dense is None
    return rec.q_offset, rec.q_offset + row_count(rec), rec.k_offset, keys, batch_of(rec), joinable


def _meet(prev: _Edges, part: _Edges) -> bool:
    """:func:`follows` of the parts with these edges."""
    keys = prev[3] is None or part[3] is None or prev[3] == part[2]
    return prev[1] == part[0] and keys and prev[5] and part[5] and prev[4] == part[4]


def join_run(run: list[Record]) -> Record:
    """The run as one record (:func:`join`); its mask is the last part's (whose ``key_valid`` covers
    every key)."""
    if len(run) == 1:
        return run[0]
    out = join(run)  # (a new record)
    out.mask = run[-1].mask
    return out


def row_count(rec: Record) -> int:
    """Query rows of a record as a store writes them: the rows of its first tensor of ``q``, ``attn``,
    ``lse`` and the ``entropy`` summary (with row windows, ``attn`` holds the windows' rows only;
    :func:`rows_of` counts none there)."""
    entropy = rec.summary.get("entropy") if rec.summary is not None else None
    for t in (rec.q, rec.attn, rec.lse, entropy):
        if t is not None:
            return int(t.shape[2])
    return 0


def batch_of(rec: Record) -> int:
    """Samples of a record: the batch of its first tensor of ``q``, ``k``, ``attn``, ``lse`` and the
    ``entropy`` summary (0 when it has none)."""
    entropy = rec.summary.get("entropy") if rec.summary is not None else None
    for t in (rec.q, rec.k, rec.attn, rec.lse, entropy):
        if t is not None:
            return int(t.shape[0])
    return 0
