"""Checking a whole store for damage: :func:`verify`.

Every committed step of every module (every rank of a rank set) is read back through the checked
reads (:mod:`attnhooks.read.integrity`): each chunk's checksum is verified and each chunk a call's
tensors need is looked for. Nothing is written; a damaged step is reported, the others are not
touched. Stores written before checksums existed are read the same way (a chunk that fails to
decode is still found; a flipped bit in an uncompressed chunk, or a missing chunk, is not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from attnhooks.errors import StoreCorruptError
from attnhooks.read.store import Store, open_store
from attnhooks.read.tiles import CallReader, runs

__all__ = ["Damage", "VerifyReport", "verify"]

_BLOCK_BYTES = 1 << 26  # at most this much of one tensor is held at a time (64 MiB of float32)


@dataclass(frozen=True)
class Damage:
    """One damaged read: where, and what the reader found."""

    rank: int
    module: str | None  # None: the store's own tables (steps, the module's per-call tables)
    step: int | None
    call: int | None
    array: str
    what: str

    def __str__(self) -> str:
        where = [f"rank {self.rank}"] if self.rank else []
        where += [f"module {self.module}"] if self.module else []
        where += [f"step {self.step}"] if self.step is not None else []
        where += [f"call {self.call}"] if self.call is not None else []
        return f"{', '.join(where) or 'store'}: {self.array} {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` read and found."""

    location: str
    steps: int = 0
    calls: int = 0
    checksummed: bool = True
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def damaged_steps(self) -> list[int]:
        """The user step ids with damage (a rank set: of any rank)."""
        return sorted({d.step for d in self.damage if d.step is not None})

    def __str__(self) -> str:
        head = f"{self.location}: {self.steps} step(s), {self.calls} call(s) read"
        if not self.checksummed:
            head += " (written without checksums: only chunks that fail to decode can be found)"
        if self.ok:
            return f"{head}: no damage"
        lines = [f"{head}: DAMAGED, step(s) {self.damaged_steps or '-'} ({len(self.damage)} damaged read(s))"]
        lines += [f"  {d}" for d in self.damage[:50]]
        if len(self.damage) > 50:
            lines.append(f"  ... and {len(self.damage) - 50} more")
        return "\n".join(lines)


def verify(
    location: str | os.PathLike[str],
    *,
    backend: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every committed tensor of a store and report the damaged steps. Nothing is written.

    Args:
        location: the store.
        backend: a backend name, when the location does not say which.
        progress: called as ``progress(done, total)`` after each step of each rank.

    Example:
        >>> report = attnhooks.verify("run.zarr")  # doctest: +SKIP
        >>> report.ok, report.damaged_steps  # doctest: +SKIP
        (False, [12])
    """
    st = open_store(location, backend=backend)
    report = VerifyReport(st.location)
    try:
        ranks = [st.rank(r) for r in st.ranks]
        total, done = sum(len(r.steps) for r in ranks), 0
        for rst in ranks:
            report.checksummed &= _checksummed(rst)
            for step in rst.steps:
                report.steps += 1
                for module in _modules(rst, report):
                    report.calls += _verify_step(rst, module, step, report)
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        st.close()
    return report


def _checksummed(st: Store) -> bool:
    """True when the store's tensors carry checksums (its backend says so for the first one found)."""
    checks = getattr(st.backend, "checksummed", None)
    if checks is None:
        return False
    for module in st.modules:
        for leaf in ("q", "k", "attn", "lse"):
            path = f"{st.module_path(module)}/{leaf}"
            if st.backend.contains(path):
                return bool(checks(path))
    return True


def _modules(st: Store, report: VerifyReport) -> list[str]:
    try:
        return st.modules
    except StoreCorruptError as err:
        report.damage.append(Damage(st.default_rank, None, None, None, err.array, err.what))
        return []


def _verify_step(st: Store, module: str, step: int, report: VerifyReport) -> int:
    """Read every tensor of ``module`` at ``step``; returns the calls read."""
    try:
        calls = st.calls(module, step)
        batches = [int(st.info(module, step, call)["batch"]) for call in range(calls)]
    except StoreCorruptError as err:
        report.damage.append(Damage(st.default_rank, module, step, None, err.array, err.what))
        return 0
    for call, batch in enumerate(batches):
        for sample in range(batch):
            reader = st.call_reader(module, step, sample, call)
            for array, read in _reads(reader):
                try:
                    read()
                except StoreCorruptError as err:
                    report.damage.append(Damage(st.default_rank, module, step, call, err.array or array, err.what))
                    break  # one damaged read per sample is enough to name the step
    return len(batches)


def _reads(reader: CallReader) -> Iterator[tuple[str, Callable[[], object]]]:
    """The reads that cover every stored tensor of one call and sample, in bounded blocks."""
    lay = reader.layout
    heads = np.arange(lay.heads)
    for rows in _row_blocks(reader.q_len, lay.heads * 64):
        if reader.has("q"):
            yield "q", partial(reader.queries, heads, rows)
        if reader.has("lse"):
            yield "lse", partial(reader.lse, heads, rows)
    if reader.has("k") and reader.k_stored:
        kv = np.arange(lay.kv_heads) * (lay.heads // lay.kv_heads)
        for cols in _row_blocks(reader.k_stored, lay.kv_heads * 64):
            yield "k", partial(reader.keys, kv, slice(reader.k_offset + cols.start, reader.k_offset + cols.stop))
    if reader.has("attn"):
        for start, stop in runs(reader.stored_rows):  # (row windows: only some rows were stored)
            for rows in _row_blocks(stop - start, lay.heads * max(reader.k_len, 1)):
                part = slice(start + rows.start, start + rows.stop)
                yield "attn", partial(reader.stored, heads, part, slice(0, reader.k_len))
    if reader.has("parent"):
        yield "parent", lambda: reader.parent


def _row_blocks(n: int, row_values: int) -> list[slice]:
    step = max(1, _BLOCK_BYTES // (4 * max(row_values, 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]
