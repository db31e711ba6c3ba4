"""One writer per store: a lease file beside the store (``run.zarr.lease``, ``run.h5.lease``; one per
rank of a rank set, ``run.zarr.rank3.lease``).

A writer takes the lease before it creates or opens the store, and gives it back when it closes.
The lease file is created with ``O_CREAT | O_EXCL`` (atomic on local and network file systems that
follow POSIX: of two writers, exactly one creates it) and holds the holder's host, pid, start time
and a random token, written once. The holder's heartbeat is the file's modification time, touched
every ``timeout / 4`` seconds by a daemon thread. A lease is *stale*, and may be taken over, when
its holder's pid is gone (or a zombie) on this host, or when its heartbeat is older than ``timeout``
(default 120 s, ``ATTNHOOKS_LEASE_TIMEOUT``): a writer on another host, or a stopped process, is
only known dead after the timeout.

A stale lease is moved aside (``rename``: one of several racing takers wins it), checked to be the
one judged stale (else put back), then removed, and the lease taken afresh.

What this does not cover: stores on URLs (object stores have no create-if-absent through fsspec;
a store there takes no lease, and one writer per store is the user's to ensure), and file systems
where ``O_EXCL`` is not atomic (old NFS).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from attnhooks.errors import StoreBusyError

__all__ = ["Holder", "Lease", "lease_path", "live_holders", "stale_leases"]

TIMEOUT_ENV = "ATTNHOOKS_LEASE_TIMEOUT"
DEFAULT_TIMEOUT = 120.0


def timeout() -> float:
    """Seconds without a heartbeat after which a lease is stale (``ATTNHOOKS_LEASE_TIMEOUT``)."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def lease_path(location: str, rank: int | None = None) -> str | None:
    """The lease file of the store at ``location`` (of one rank of a rank set), or None for a store
    that takes no lease (a URL, a memory store)."""
    for scheme in ("file://", "zarr://", "hdf5://", "h5://"):
        location = location.removeprefix(scheme)
    if "://" in location:
        return None
    base = os.path.abspath(location.rstrip("/"))
    return f"{base}.rank{rank}.lease" if rank is not None else f"{base}.lease"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, read from its file; ``heartbeat``: the file's modification time."""

    path: str
    host: str
    pid: int
    started: float
    token: str
    heartbeat: float

    def stale(self, limit: float | None = None) -> bool:
        """True when the holder is known gone: its pid is dead on this host, or its heartbeat is older
        than ``limit`` seconds (default :func:`timeout`)."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return time.time() - self.heartbeat > (timeout() if limit is None else limit)

    def __str__(self) -> str:
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host} (since {time.ctime(self.started)}, last heartbeat {age:.0f} s ago)"


def read_holder(path: str) -> Holder | None:
    """The holder recorded in the lease file ``path``; None when there is no such file. A file still
    being written (empty, or not JSON yet) reads as a holder of unknown pid with its mtime."""
    try:
        beat = os.stat(path).st_mtime
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Holder(path, str(data["host"]), int(data["pid"]), float(data["started"]), str(data["token"]), beat)
    except (ValueError, KeyError, TypeError):
        return Holder(path, "?", -1, beat, "", beat)  # being written right now, or garbage: judged by its age


class Lease:
    """A lease this process holds (see the module docstring). Use :meth:`take`; :meth:`release` at close."""

    def __init__(self, path: str, token: str, beat: float) -> None:
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(beat,), name="attnhooks-lease", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, location: str, *, rank: int | None = None, what: str = "write") -> Lease | None:
        """Take the lease of ``location``; None for a store that takes none.

        Raises:
            StoreBusyError: a live writer holds it (naming host, pid and heartbeat).
        """
        path = lease_path(location, rank)
        if path is None:
            return None
        for _ in range(8):
            token = uuid.uuid4().hex
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(path)
                if holder is not None and not holder.stale():
                    raise StoreBusyError(
                        f"cannot {what} {location}: another writer holds it, {holder}; wait for it to finish, or, if "
                        f"it is gone, remove {path} (a lease is taken over by itself {timeout():.0f} s after the "
                        f"last heartbeat, at once when the pid is gone on this host)"
                    ) from None
                if holder is not None:
                    _take_over(holder)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(
                        {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": token}, f
                    )
            except BaseException:  # a full disk, say: no half-written lease is left to block the next writer
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                raise
            return cls(path, token, timeout() / 4)
        raise StoreBusyError(f"cannot {what} {location}: its lease {path} keeps changing hands; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, if it is still this one."""
        self._stop.set()
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _take_over(stale: Holder) -> None:
    """Move the stale lease aside and remove it; put it back when what was moved is not the lease
    judged stale (another taker replaced it meanwhile)."""
    aside = f"{stale.path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(stale.path, aside)
    except FileNotFoundError:
        return  # another taker moved it first
    moved = read_holder(aside)
    if moved is not None and moved.token != stale.token:
        with contextlib.suppress(FileExistsError):
            os.link(aside, stale.path)  # a fresh lease: back where it was
    with contextlib.suppress(FileNotFoundError):
        os.remove(aside)


def live_holders(location: str) -> list[Holder]:
    """The live leases of the store at ``location`` (and of each rank of a rank set)."""
    return [h for h in _holders(location) if not h.stale()]


def stale_leases(location: str) -> list[Holder]:
    """The stale leases of the store at ``location`` (left by killed writers)."""
    return [h for h in _holders(location) if h.stale()]


def _holders(location: str) -> list[Holder]:
    path = lease_path(location)
    if path is None:
        return []
    base = path.removesuffix(".lease")
    folder = os.path.dirname(base) or "."
    name = os.path.basename(base)
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            if entry == f"{name}.lease" or (entry.startswith(f"{name}.rank") and entry.endswith(".lease")):
                holder = read_holder(os.path.join(folder, entry))
                if holder is not None:
                    found.append(holder)
    return found


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie, killed but not yet reaped, is dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): the pid exists
