"""Repairing a store left by a killed writer: :func:`repair`."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from attnhooks.backends.base import Backend, backend_for
from attnhooks.backends.lease import Lease, live_holders, stale_leases
from attnhooks.backends.subtree import LAYOUT, group, present, subtree
from attnhooks.errors import AttnHooksError, NotAStoreError, StoreBusyError, StoreCorruptError, StoreWriteError
from attnhooks.read.store import Store
from attnhooks.schema import STATUS_COMPLETE, STATUS_RECOVERED, STATUS_WRITING, trim

__all__ = ["RepairReport", "repair"]


@dataclass
class RepairReport:
    """What :func:`repair` found and did."""

    location: str
    status_before: str
    status: str
    committed: int
    removed: list[str] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)
    ranks: dict[int, RepairReport] = field(default_factory=dict)
    """For a rank set: each rank's report (the fields above then sum or summarise them)."""

    def __str__(self) -> str:
        lines = [
            f"{self.location}: {self.status_before} -> {self.status}, {self.committed} committed step(s); "
            f"removed {len(self.removed)} leftover(s), trimmed {len(self.trimmed)} array(s)"
        ]
        lines += [f"  rank {rank}: {report}" for rank, report in self.ranks.items()]
        return "\n".join(lines)


def repair(location: str | os.PathLike[str], *, backend: str | None = None, force: bool = False) -> RepairReport:
    """Make a store left by a killed writer whole again: remove the engine's leftovers, cut every
    array to the committed steps, and mark it ``recovered``.

    A complete store is left as it is (its leftovers, if any, are still removed). In a rank set
    (written under ``torch.distributed``) every rank is repaired on its own. A writer's lease
    (:mod:`attnhooks.backends.lease`) left by a killed writer is removed; repair holds the lease itself
    while it works, so no writer starts meanwhile.

    Raises:
        StoreBusyError: a live writer holds the store (repairing would cut what it is writing); with
            ``force=True`` its lease is removed and the store repaired anyway: only for a writer you
            know is gone (on another host, before its heartbeat timed out).
    """
    text = os.fspath(location)
    cls = backend_for(text, backend)
    live = live_holders(text)
    if live and not force:
        raise StoreBusyError(
            f"cannot repair {text} while a writer holds it: {'; '.join(map(str, live))}. Repair cuts the store to "
            "its committed steps, under a running writer it would destroy what it writes; wait for it to finish, "
            "or pass force=True (CLI: --force) if you know it is gone"
        )
    leases = [h.path for h in (live + stale_leases(text))]
    for path in leases:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    own = Lease.take(text, what="repair")
    try:
        report = _repair_store(text, cls)
    finally:
        if own is not None:
            own.release()
    report.removed[:0] = [f"lease {os.path.basename(path)}" for path in leases]
    return report


def _repair_store(text: str, cls: type[Backend]) -> RepairReport:
    try:
        removed = cls.cleanup(text)
        be = cls.open(text, "r+")
    except AttnHooksError:
        raise
    except PermissionError as err:
        raise StoreWriteError(f"cannot repair {text}: {err}") from err
    except OSError as err:
        raise NotAStoreError(f"cannot open {text} as a store: {err}") from err
    except (RuntimeError, KeyError) as err:  # the engine's rewrite met a part it cannot read (HDF5)
        raise StoreCorruptError(
            text,
            "",
            [],
            "does not copy",
            message=f"cannot repair {text}: a part of it that committed steps may need does not read ({err}). "
            "The file is left as it was: open it with attnhooks.open_store to read what still reads, and "
            "write new captures to a new store",
        ) from err
    try:
        if be.attrs("").get("layout") != LAYOUT:
            return _repair(be, text, removed)
        ranks = {rank: _repair(subtree(be, group(rank)), f"rank {rank}", []) for rank in present(be)}
    finally:
        be.close()
    reports = list(ranks.values())
    before = STATUS_WRITING if any(r.status_before == STATUS_WRITING for r in reports) else STATUS_COMPLETE
    status = STATUS_RECOVERED if any(r.status == STATUS_RECOVERED for r in reports) else before
    trimmed = [f"{group(rank)}/{path}" for rank, r in ranks.items() for path in r.trimmed]
    return RepairReport(text, before, status, sum(r.committed for r in reports), removed, trimmed, ranks)


def _repair(be: Backend, name: str, removed: list[str]) -> RepairReport:
    """Cut one store's arrays to its committed steps and mark it recovered when it was left writing."""
    store = Store(be)  # validates the schema
    before = store.status
    committed = store.committed
    trimmed = trim(be, committed)
    if be.contains("dropped_steps"):
        n = store.dropped
        if be.shape("dropped_steps")[0] != n:
            be.resize("dropped_steps", (n,))
    status = STATUS_RECOVERED if before == STATUS_WRITING else before
    if status != before:
        be.set_attrs("", {"status": status, "recovered": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    be.flush()
    return RepairReport(name, before, status, committed, removed, trimmed)
