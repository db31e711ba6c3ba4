"""The attributes of a store being written: a new store's root, where an append resumes (and
what it refuses), and each module's group, checked against the store appended to."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from attnhooks.backends.base import Backend
from attnhooks.capturing.record import Record
from attnhooks.errors import StoreMismatchError, StoreStateError
from attnhooks.schema import INFO, SCALARS, SCHEMA, STATUS_WRITING, SUPPORTED, module_path
from attnhooks.write.options import StoreOptions

__all__ = ["Start", "create", "now", "open_module", "resume", "root_attrs"]


@dataclass(frozen=True)
class Start:
    """Where a writer starts: a new store (the defaults), or the end of a store it appends to.

    Attributes:
        committed: positions committed (the next step's position).
        dropped: steps dropped so far, and ``dropped_steps`` which.
        last_step: the user step at the last committed position.
        modules: the names of the modules the store holds ("not called" is written for them).
        appending: the store existed; its status becomes ``writing`` only once this run commits.
        steps: the step ids the store holds already (a step id is used once per store).
    """

    committed: int = 0
    dropped: int = 0
    dropped_steps: tuple[int, ...] = ()
    last_step: int | None = None
    modules: frozenset[str] = frozenset()
    appending: bool = False
    steps: frozenset[int] = frozenset()


def root_attrs(backend: type[Backend] | Backend, options: StoreOptions, meta: dict[str, Any]) -> dict[str, Any]:
    """The root attributes of a new store (status ``writing``, nothing committed)."""
    codec = options.codec or backend.default_codec
    return {
        "schema": SCHEMA,
        "status": STATUS_WRITING,
        "committed": 0,
        "dropped": 0,
        "created": now(),
        "closed": "",
        "versions": _versions(backend),
        "compression": {"name": codec.name, "level": codec.level},
        **meta,
    }


def create(backend: Backend, options: StoreOptions, meta: dict[str, Any]) -> Start:
    """Root attributes for a backend handed over already open (a path's backend was created
    with them, atomically)."""
    if backend.attrs("").get("schema") is None:
        backend.set_attrs("", root_attrs(backend, options, meta))
        backend.flush()
    return Start()


def resume(backend: Backend) -> Start:
    """Where a writer appending to the store at ``backend`` starts; changes nothing in the store.

    Raises:
        StoreMismatchError: the store has a schema this version does not append to.
        StoreStateError: the store was not closed (a writer is running, or was killed).
    """
    attrs = backend.attrs("")
    if attrs.get("schema") not in SUPPORTED:
        raise StoreMismatchError(
            f"{backend.location} has schema {attrs.get('schema')!r}; this version appends to {SCHEMA}"
        )
    if attrs.get("status") == STATUS_WRITING:
        raise StoreStateError(
            f"{backend.location} was not closed (its writer is still running, or was killed); "
            f"if no writer is running, run attnhooks.repair({backend.location!r}) before appending"
        )
    committed = int(attrs.get("committed", 0))
    dropped = int(attrs.get("dropped", 0))
    last_step = None
    steps: frozenset[int] = frozenset()
    if committed and backend.contains("steps"):
        stored = backend.read("steps", (slice(0, committed),))
        last_step, steps = int(stored[-1]), frozenset(int(s) for s in stored)
    groups = backend.children("modules") if backend.contains("modules") else []
    modules = frozenset(backend.attrs(f"modules/{m}").get("name", m) for m in groups)
    dropped_steps: tuple[int, ...] = ()
    if backend.contains("dropped_steps"):
        dropped_steps = tuple(int(x) for x in backend.read("dropped_steps", (slice(0, dropped),)))
    return Start(committed, dropped, dropped_steps, last_step, modules, appending=True, steps=steps)


def open_module(
    backend: Backend, rec: Record, stored: str, appending: frozenset[str], fresh: bool = False
) -> dict[str, Any]:
    """Create the group of ``rec``'s module, with its attributes (``stored``: its storage dtype).

    Args:
        backend: the store's backend.
        rec: the module's first record in this run.
        stored: the storage dtype of its q and k.
        appending: the modules of the store appended to (empty for a new store).
        fresh: the store held nothing when the writer began (its group cannot exist: not asked).

    Returns:
        The module's attributes: a group the store held keeps its own, completed with the new ones.

    Raises:
        StoreMismatchError: appending, and the module's shape differs from the store's, or the store
            has other modules but not this one.
    """
    attrs = _module_attrs(rec, stored)
    path = module_path(rec.module)
    if not fresh and backend.contains(path):
        old = backend.attrs(path)
        for key in ("heads", "kv_heads", "head_dim", "kind"):
            if old.get(key) is not None and attrs.get(key) is not None and old[key] != attrs[key]:
                raise StoreMismatchError(
                    f"appending to {backend.location}: module {rec.module!r} has {key}={attrs[key]} "
                    f"but the store holds {key}={old[key]}"
                )
        # the group keeps its attributes; those it lacks are added, and nothing else is written: an
        # append rewrites no attribute of a module holding committed steps (no metadata a kill could tear)
        lacking = {k: v for k, v in attrs.items() if old.get(k) is None and (v is not None or k not in old)}
        if lacking:
            backend.set_attrs(path, lacking)
        return {**old, **lacking}
    if appending:
        raise StoreMismatchError(
            f"appending to {backend.location}: this capture records module {rec.module!r}, which the "
            f"store does not have (it has {sorted(appending)}); capture the same modules "
            "or write a new store"
        )
    make = getattr(backend, "create_group_with", None)  # optional: the group and its attributes at once
    if make is not None:
        make(path, attrs)
    else:
        backend.create_group(path)
        backend.set_attrs(path, attrs)
    return attrs


def now() -> str:
    """The time now, as stored in ``created`` and ``closed`` (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
