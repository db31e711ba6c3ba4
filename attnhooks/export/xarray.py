"""A store as an xarray Dataset of lazy dask arrays: :meth:`Store.to_xarray`.

Each dask chunk is one head of one call of one sample over a block of query rows, read (stored
``attn``) or rebuilt exactly from q, k and lse when computed, so any reduction over a store larger
than memory streams through it chunk by chunk, on the local scheduler or a dask cluster (the
arrays re-open the store by location in each worker; ``memory://`` stores are local to a process).

A rank set (a store written under ``torch.distributed``) has one more dimension, ``rank``, after
``module``; its ``step`` coordinate is every step any rank committed, in order.

Values that do not exist (rows past a call's ``q_len``, samples past its batch, calls a step did
not make, steps a rank did not commit) are NaN, so xarray's NaN-skipping reductions average over
real rows only; keys a row could not attend are 0, as in the model's matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from attnhooks.errors import StoreOptionError
from attnhooks.schema import INFO

if TYPE_CHECKING:
    from attnhooks.read.store import Store

__all__ = ["VARIABLES", "to_xarray"]

VARIABLES = ("attention", "n_keys", "lse", "q", "k")
_CHUNK_BYTES = 16 << 20  # target size of one attention chunk


@dataclass(frozen=True)
class _Extent:
    """Largest sizes of one module over the committed steps, from its ``info`` table."""

    steps: int
    calls: int
    batch: int
    q_len: int
    k_len: int
    heads: int
    kv_heads: int
    head_dim: int


def to_xarray(
    store: Store,
    modules: str | Sequence[str] | None = None,
    variables: Sequence[str] = ("attention",),
    method: str = "auto",
    rows: int | None = None,
) -> Any:
    """The store's modules as one ``xarray.Dataset`` (see :meth:`attnhooks.Store.to_xarray`)."""
    try:
        import dask.array as da
        import xarray as xr
    except ImportError as err:
        raise StoreOptionError(f"to_xarray() needs xarray and dask: pip install 'attnhooks[analysis]' ({err})") from err
    names = store.select(modules)
    unknown = sorted(set(variables) - set(VARIABLES))
    if unknown:
        raise StoreOptionError(f"to_xarray(variables=...) has unknown {unknown}; choose from {VARIABLES}")
    ranks: list[int | None] = list(store.ranks) if store.rank_set else [None]
    stores = [store.rank(r) if r is not None else store for r in ranks]
    steps = list(dict.fromkeys(step for st in stores for step in st.steps))
    extents = {(name, i): _extent(st, name) for name in names for i, st in enumerate(stores)}
    shared = dataclasses.replace(_shared(extents), steps=len(steps))
    chunk_rows = rows or max(1, min(shared.q_len, _CHUNK_BYTES // (4 * max(1, shared.k_len))))
    lead = ("module", "rank") if store.rank_set else ("module",)
    data: dict[str, Any] = {}
    for var in variables:
        per_module = []
        for name in names:
            per_rank = [
                da.from_array(  # type: ignore[no-untyped-call]
                    _Lazy(store.location, store.backend.name, name, var, method, shared, rank, tuple(steps)),
                    chunks=_chunks(var, shared, chunk_rows),
                    meta=np.empty((0,) * len(_dims(var)), dtype=np.float32),
                    lock=False,
                    asarray=False,
                    name=f"attnhooks-{var}-{store.location}-{rank}-{name}-{method}-{shared}-{hash(tuple(steps))}",
                )
                for rank in ranks
            ]
            per_module.append(da.stack(per_rank) if store.rank_set else per_rank[0])  # type: ignore[no-untyped-call]
        data[var] = ((*lead, *_dims(var)), da.stack(per_module))  # type: ignore[no-untyped-call]
    coords: dict[str, Any] = {
        "module": list(names),
        "step": steps,
        "head": np.arange(shared.heads),
        "query": np.arange(shared.q_len),
        "key": np.arange(shared.k_len),
    }
    if store.rank_set:
        coords["rank"] = list(store.ranks)
    attrs = {"location": store.location, "schema": store.schema, "status": store.status, "method": method}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _extent(store: Store, module: str) -> _Extent:
    if module not in store.modules:  # a rank that never ran it
        return _Extent(0, 0, 0, 0, 0, 0, 0, 0)
    base = store.module_path(module)
    attrs = store.backend.attrs(base)
    n = store.committed
    info = store.backend.read(f"{base}/info", (slice(0, n),)) if n else np.zeros((0, 0, len(INFO)), np.int64)
    top = info.max(axis=(0, 1)) if info.size else np.zeros(len(INFO), np.int64)
    col = {name: int(top[i]) for i, name in enumerate(INFO)}
    heads = int(attrs.get("heads") or 0)
    return _Extent(
        steps=n,
        calls=int(info.shape[1]) if info.size else 0,
        batch=col["batch"],
        q_len=col["q_len"],
        k_len=col["k_len"],
        heads=heads,
        kv_heads=int(attrs.get("kv_heads") or heads),
        head_dim=int(attrs.get("head_dim") or 0),
    )


def _shared(extents: dict[tuple[str, int], _Extent]) -> _Extent:
    """The largest sizes over modules and ranks (ranks that never ran a module do not count)."""
    extents = {key: e for key, e in extents.items() if e.heads} or extents
    heads = {e.heads for e in extents.values()}
    kv_heads = {e.kv_heads for e in extents.values()}
    dims = {e.head_dim for e in extents.values()}
    if len(heads) > 1 or len(kv_heads) > 1 or len(dims) > 1:
        raise StoreOptionError(
            f"to_xarray(): the modules differ in heads / kv_heads / head_dim ({sorted(heads)}, {sorted(kv_heads)}, "
            f"{sorted(dims)}); pass modules= a group that shares them"
        )
    e = list(extents.values())
    return _Extent(
        steps=e[0].steps,
        calls=max(x.calls for x in e),
        batch=max(x.batch for x in e),
        q_len=max(x.q_len for x in e),
        k_len=max(x.k_len for x in e),
        heads=e[0].heads,
        kv_heads=e[0].kv_heads,
        head_dim=e[0].head_dim,
    )


def _dims(var: str) -> tuple[str, ...]:
    return {
        "attention": ("step", "call", "sample", "head", "query", "key"),
        "n_keys": ("step", "call", "sample", "head", "query"),
        "lse": ("step", "call", "sample", "head", "query"),
        "q": ("step", "call", "sample", "head", "query", "dim"),
        "k": ("step", "call", "sample", "kv_head", "key", "dim"),
    }[var]


def _shape(var: str, e: _Extent) -> tuple[int, ...]:
    lead = (e.steps, e.calls, e.batch)
    return {
        "attention": (*lead, e.heads, e.q_len, e.k_len),
        "n_keys": (*lead, e.heads, e.q_len),
        "lse": (*lead, e.heads, e.q_len),
        "q": (*lead, e.heads, e.q_len, e.head_dim),
        "k": (*lead, e.kv_heads, e.k_len, e.head_dim),
    }[var]


def _chunks(var: str, e: _Extent, rows: int) -> tuple[int, ...]:
    shape = _shape(var, e)
    if var in ("attention", "n_keys", "lse"):
        return (1, 1, 1, 1, rows, *shape[5:])
    return (1, 1, 1, *shape[3:])


class _Lazy:
    """One variable of one module, as an array dask can slice: each ``[...]`` reads one block."""

    def __init__(
        self,
        location: str,
        backend: str,
        module: str,
        var: str,
        method: str,
        extent: _Extent,
        rank: int | None,
        steps: tuple[int, ...],
    ) -> None:
        self.location, self.backend, self.module, self.var, self.method = location, backend, module, var, method
        self.extent, self.rank, self.steps = extent, rank, steps
        self.shape = _shape(var, extent)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self._store: Store | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}  # a worker re-opens the store by location

    def _open(self) -> Store:
        if self._store is None:
            from attnhooks.read.store import open_store

            store = open_store(self.location, backend=self.backend)
            self._store = store if self.rank is None else store.rank(self.rank)
        return self._store

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        sel = [range(*s.indices(n)) for s, n in zip(key, self.shape)]
        out = np.full([len(r) for r in sel], np.nan, dtype=np.float32)
        store = self._open()
        if self.module not in store.modules:
            return out
        for a, pos in enumerate(sel[0]):
            step = self.steps[pos]
            if not store.has_step(step):
                continue
            for b, call in enumerate(sel[1]):
                if call >= store.calls(self.module, step):
                    continue
                batch = store.info(self.module, step, call)["batch"]
                for c, sample in enumerate(sel[2]):
                    if sample < batch:
                        reader = store.call_reader(self.module, step, sample, call)
                        out[a, b, c] = self._block(store, reader, step, sample, call, sel[3:])
        return out

    def _block(self, store: Store, reader: Any, step: int, sample: int, call: int, sel: list[range]) -> np.ndarray:
        """The block ``[heads, *rest]`` of one call and sample; NaN where rows do not exist."""
        out = np.full([len(r) for r in sel], np.nan, dtype=np.float32)
        heads = np.asarray(sel[0], dtype=np.int64)
        rows = _clip(sel[1], reader.q_len if self.var != "k" else reader.k_len)
        if rows.stop <= rows.start:
            return out
        local = slice(rows.start - sel[1].start, rows.stop - sel[1].start)
        if self.var == "attention":
            cols = _clip(sel[2], reader.k_len)
            tile = np.zeros((heads.size, rows.stop - rows.start, len(sel[2])), dtype=np.float32)
            tile[:, :, cols.start - sel[2].start : cols.stop - sel[2].start] = reader.read(
                heads, rows, cols, self.method
            )
            out[:, local] = tile
        elif self.var == "n_keys":
            out[:, local] = reader.key_counts(heads, rows)
        elif self.var == "lse":
            out[:, local] = reader.lse(heads, rows)
        else:
            getter = store.q if self.var == "q" else store.k
            values = getter(self.module, step, sample, call)[heads]
            if self.var == "k":
                rows = slice(max(rows.start, reader.k_offset), min(rows.stop, reader.k_offset + reader.k_stored))
                local = slice(rows.start - sel[1].start, rows.stop - sel[1].start)
                values = values[:, rows.start - reader.k_offset : rows.stop - reader.k_offset]
            else:
                values = values[:, rows]
            out[:, local, : values.shape[-1]] = values[..., sel[2].start : sel[2].stop]
        return out


def _clip(r: range, size: int) -> slice:
    return slice(min(r.start, size), min(r.stop, size))
