"""Reading stores: :func:`open_store` and :class:`Store`.

The reader needs numpy and a backend only (no torch, no model). Opening reads the root metadata;
arrays are read when asked for, one call's block at a time. Only the first ``committed`` steps
exist: a store whose writer was killed opens and shows exactly those.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend, backend_for
from attnhooks.backends.subtree import LAYOUT, group, present, subtree
from attnhooks.errors import AttnHooksError, NotAStoreError, NotInStoreError
from attnhooks.names import match_names
from attnhooks.read.tiles import CallLayout, CallReader, HeadSelection, head_index, span, widen_bits
from attnhooks.schema import INFO, ROWWISE, SCALARS, SUPPORTED, unescape

__all__ = ["NotInStoreError", "Store", "open_store"]  # NotInStoreError re-exported for old imports


def open_store(location: str | os.PathLike[str], mode: str = "r", *, backend: str | None = None) -> Store:
    """Open a store written by :func:`attnhooks.capture` (read-only by default).

    Args:
        location: a ``.zarr`` directory, an ``.h5`` / ``.hdf5`` file, or a URL such as ``memory://run``.
        mode: ``"r"`` (read-only) or ``"r+"``.
        backend: a backend name, when the location does not say which.

    Raises:
        NotAStoreError: the location is not an attnhooks store, or its schema is one this version
            does not read. Nothing in a store is ever unpickled.
    """
    if mode not in ("r", "r+"):
        raise NotAStoreError(f"open_store(mode={mode!r}): use 'r' or 'r+'; capture(..., store=) writes stores")
    text = os.fspath(location)
    try:
        be = backend_for(text, backend).open(text, mode)
    except AttnHooksError:
        raise
    except OSError as err:
        raise NotAStoreError(f"cannot open {text} as a store: {err}") from err
    return Store(be)


class Store:
    """An attnhooks store, read through its backend. See :func:`open_store`.

    A store written under ``torch.distributed`` is a rank set (:mod:`attnhooks.backends.subtree`): every
    method then reads the lowest rank unless given ``rank=``; :attr:`ranks` lists the ranks and
    :meth:`rank` gives one rank's store.
    """

    def __init__(self, backend: Backend, *, _set: Store | None = None) -> None:
        self._root = backend
        self.backend = backend
        self.location = backend.location
        self._set = _set  # the rank set this store reads a rank of (itself for the set), or None
        self._children: dict[int, Store] = {}
        self._rank_ids: list[int] = []
        self._modules: dict[str, str] | None = None
        self._lock = threading.Lock()  # dask may read from several threads
        self.refresh()

    def refresh(self) -> None:
        """Re-read the root metadata (a store still being written may have committed more steps;
        a rank set may have gained ranks)."""
        attrs = self._checked(self._root.attrs(""))
        if attrs.get("layout") == LAYOUT:
            self._set, self._children, self._rank_ids = self, {}, present(self._root)
            if self._rank_ids:
                self.backend = subtree(self._root, group(self._rank_ids[0]))
                attrs = self._checked(self.backend.attrs(""))
            else:
                attrs = {**attrs, "rank": 0}  # no rank has started writing yet: an empty store
        self.metadata: dict[str, Any] = attrs
        self.committed = int(attrs.get("committed", 0))
        self._steps = self._read_steps()
        self._step_pos = {step: pos for pos, step in reversed(list(enumerate(self._steps)))}
        self._modules = None
        self._tables: dict[str, _Tables] = {}
        self._readers: OrderedDict[tuple[str, int, int, int], CallReader] = OrderedDict()

    def _checked(self, attrs: dict[str, Any]) -> dict[str, Any]:
        schema = attrs.get("schema")
        if schema is None:
            raise NotAStoreError(f"{self.location} is not an attnhooks store (its root has no 'schema' attribute)")
        if schema not in SUPPORTED:
            raise NotAStoreError(
                f"{self.location} has schema {schema!r}; this attnhooks reads {', '.join(SUPPORTED)}: upgrade attnhooks"
            )
        return attrs

    # -- ranks ----------------------------------------------------------------------------------
    @property
    def ranks(self) -> list[int]:
        """The ranks whose captures the store holds: ``[0]`` (or the writer's rank) for a store of
        one process, every rank that has started writing for a rank set."""
        if self._set is None:
            return [self.default_rank]
        return list(self._set._rank_ids)

    @property
    def default_rank(self) -> int:
        """The rank this object reads when a method is given no ``rank=``."""
        return int(self.metadata.get("rank", 0))

    @property
    def world_size(self) -> int:
        """Processes in the job that wrote the store (1 without ``torch.distributed``)."""
        return int(self.metadata.get("world_size", 1))

    def rank(self, rank: int) -> Store:
        """The store of one rank (a :class:`Store` whose methods read that rank).

        Raises:
            NotInStoreError: the store holds no such rank.
        """
        owner = self._set
        if owner is not None and owner is not self:
            return owner.rank(rank)
        if rank == self.default_rank and (owner is None or rank in self._rank_ids):
            return self
        if owner is None or rank not in self._rank_ids:
            raise NotInStoreError(f"{self.location} has no rank {rank}; its ranks are {self.ranks}")
        with self._lock:
            child = self._children.get(rank)
            if child is None:
                child = self._children[rank] = Store(subtree(self._root, group(rank)), _set=self)
        return child

    @property
    def rank_set(self) -> bool:
        """True for a store written under ``torch.distributed`` (one group per rank)."""
        return self._set is not None

    def _at(self, rank: int | None) -> Store:
        return self if rank is None else self.rank(rank)

    # -- what is there --------------------------------------------------------------------------
    @property
    def schema(self) -> str:
        return str(self.metadata["schema"])

    @property
    def status(self) -> str:
        """``"writing"`` (open, or its writer was killed), ``"complete"`` or ``"recovered"``."""
        return str(self.metadata.get("status", ""))

    @property
    def dropped(self) -> int:
        """Steps the writer dropped because it fell behind (``when_full="drop"``)."""
        return int(self.metadata.get("dropped", 0))

    @property
    def dropped_steps(self) -> list[int]:
        n = self.dropped
        return [int(x) for x in self.backend.read("dropped_steps", (slice(0, n),))] if n else []

    @property
    def steps(self) -> list[int]:
        """User step ids of the committed steps, in the order they were written."""
        return list(self._steps)

    def has_step(self, step: int) -> bool:
        """True when ``step`` is one of the committed steps."""
        return step in self._step_pos

    @property
    def modules(self) -> list[str]:
        """Names of the modules with records, in model order when layer indices are known."""
        return list(self._module_paths())

    def self_attention(self) -> list[str]:
        """The modules whose calls are self-attention (``kind == "self"``), in model order."""
        return [m for m in self.modules if self._module_tables(m).attrs.get("kind") == "self"]

    def select(self, modules: str | Sequence[str] | None = None, *, kind: str = "self") -> list[str]:
        """Module names, in model order, from names or globs (capture's rules: ``*`` stays within a
        dotted segment, ``**`` spans segments), or None: every module of ``kind`` ("self" or
        "cross"), all modules when none is of that kind."""
        if modules is None:
            names = [m for m in self.modules if self._module_tables(m).attrs.get("kind") == kind] or self.modules
        else:
            names = match_names(self.modules, modules)
        if not names:
            raise NotInStoreError(f"modules={modules!r} matches no module of {self.location}: {_listing(self.modules)}")
        return names

    def resolve(self, module: str | int | None = None) -> str:
        """One module name from a name, a glob (its first match), an index into the self-attention
        modules (the layer; negative counts from the last), or None (the first layer)."""
        layers = self.select()
        if module is None:
            return layers[0]
        if isinstance(module, (int, np.integer)) or str(module).lstrip("-").isdigit():
            index = int(module)
            if not -len(layers) <= index < len(layers):
                raise NotInStoreError(f"layer {index} is out of range: {self.location} has {len(layers)} layers")
            return layers[index]
        return self.select(module)[0]

    def module_info(self, module: str, *, rank: int | None = None) -> dict[str, Any]:
        """The module's attributes: kind, heads, kv_heads, head_dim, scale, causal, dtype, layer, ..."""
        return dict(self._at(rank)._module_tables(module).attrs)

    def calls(self, module: str, step: int | None = None, *, rank: int | None = None) -> int:
        """Number of calls of ``module`` stored for ``step`` (0 when it was not called)."""
        st = self._at(rank)
        pos = st._position(step)
        calls = st._module_tables(module).calls
        return int(calls[pos]) if pos < calls.size else 0

    def info(self, module: str, step: int | None = None, call: int = 0, *, rank: int | None = None) -> dict[str, Any]:
        """Sizes, offsets and mask flags of one call (the ``info`` and ``scalars`` columns)."""
        st = self._at(rank)
        pos, _ = st._call(module, step, call)
        tables = st._module_tables(module)
        out: dict[str, Any] = {name: int(v) for name, v in zip(INFO, tables.info[pos, call])}
        out.update({name: float(v) for name, v in zip(SCALARS, tables.scalars[pos, call])})
        return out

    # -- tensors ----------------------------------------------------------------------------------
    def attention(
        self,
        module: str,
        step: int | None = None,
        sample: int = 0,
        call: int = 0,
        *,
        heads: HeadSelection = None,
        rows: slice | int | None = None,
        cols: slice | int | None = None,
        method: str = "auto",
        rank: int | None = None,
    ) -> np.ndarray:
        """Exact probabilities ``[heads, rows, cols]`` (float32) of one call and sample.

        Reads the stored ``attn`` when there is one, otherwise rebuilds the tile from q, k and lse
        (see :mod:`attnhooks.tiles`): only the rows of q, the keys of k and the mask entries the
        tile covers are read, so a window of a long sequence never costs ``q_len × k_len``.
        Rows of a KV-cache stream are zero beyond the keys that existed when they were computed,
        exactly as in the model's full causal matrix.

        Args:
            module, step, sample, call: which call (``step`` None: the first stored step).
            heads: an int (drops the axis), a slice or a list of head indices; default all.
            rows: query rows (int drops the axis, slices must be contiguous); default all.
            cols: keys, as ``rows``.
            method: ``"auto"`` (stored when available), ``"stored"`` or ``"reconstructed"``.
            rank: which rank of a store written under ``torch.distributed`` (default: the lowest).

        Example:
            >>> st.attention("model.layers.0.self_attn", step=0, heads=3, rows=slice(-256, None))  # doctest: +SKIP
        """
        reader = self.call_reader(module, step, sample, call, rank=rank)
        index = head_index(heads, reader.layout.heads)
        row_span, col_span = span(rows, reader.q_len, "rows"), span(cols, reader.k_len, "cols")
        out = reader.read(index, row_span, col_span, method)
        squeeze = tuple(axis for axis, sel in enumerate((heads, rows, cols)) if isinstance(sel, (int, np.integer)))
        return out.squeeze(squeeze) if squeeze else out

    def row_tiles(
        self,
        module: str,
        step: int | None = None,
        sample: int = 0,
        call: int = 0,
        *,
        heads: HeadSelection = None,
        tile: int = 512,
        method: str = "auto",
        rank: int | None = None,
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, probabilities [heads, len(rows), k_len])`` over all query rows, ``tile``
        rows at a time: analysis of a long sequence holds one tile, never the whole matrix."""
        reader = self.call_reader(module, step, sample, call, rank=rank)
        index = head_index(heads, reader.layout.heads)
        reader.method(method)  # refuses at once what cannot be read
        for start in range(0, reader.q_len, max(1, tile)):
            rows = slice(start, min(start + tile, reader.q_len))
            yield rows, reader.read(index, rows, slice(0, reader.k_len), method)

    def to_xarray(
        self,
        modules: str | Sequence[str] | None = None,
        *,
        variables: Sequence[str] = ("attention",),
        method: str = "auto",
        rows: int | None = None,
    ) -> Any:
        """The store as an ``xarray.Dataset`` of lazy dask arrays with named dimensions.

        Dimensions: ``module, step, call, sample, head, query, key`` (``dim`` and ``kv_head`` for
        q and k); a rank set (written under ``torch.distributed``) has ``rank`` after ``module``
        and every step any rank committed. Each chunk is one head of one call over ``rows`` query
        rows (default: ~16 MiB chunks), read or rebuilt exactly when computed, so reductions run
        over stores larger than memory. Rows that do not exist are NaN (xarray's reductions skip
        them; sum over ``key`` with ``min_count=1`` so that they stay NaN); keys a row could not
        attend are 0. Needs ``attnhooks[analysis]`` (xarray, dask).

        Args:
            modules: a name or names; default every self-attention module (all modules when there
                is none). They must share heads and head_dim.
            variables: any of ``"attention"``, ``"n_keys"`` (keys each row may attend), ``"lse"``,
                ``"q"``, ``"k"``.
            method: as for :meth:`attention`.
            rows: query rows per chunk.

        Example:
            >>> ds = st.to_xarray()  # doctest: +SKIP
            >>> p = ds.attention.where(ds.attention > 0)  # doctest: +SKIP
            >>> entropy = -(p * np.log(p)).sum("key", min_count=1)  # doctest: +SKIP
            >>> entropy.mean(["step", "sample", "query"]).compute()  # doctest: +SKIP
        """
        from attnhooks.export.xarray import to_xarray

        return to_xarray(self, modules, variables, method, rows)

    def to_bertviz(
        self,
        step: int | None = None,
        sample: int = 0,
        *,
        modules: str | Sequence[str] | None = None,
        call: int = 0,
        method: str = "auto",
        rank: int | None = None,
    ) -> tuple[tuple[Any, ...], list[str]]:
        """``(attention, tokens)`` in the format BertViz's ``head_view`` / ``model_view`` take.

        ``attention`` is a tuple with one ``[1, heads, n, n]`` float32 torch tensor per layer, as
        ``output_attentions=True`` gives, also for models captured on their SDPA path or stored as
        q/k/lse only. ``tokens`` are the stored token strings (``capture(..., tokenizer=)``), else
        the ids as strings.

        Args:
            step, sample, call: which call (``step`` None: the first stored step).
            modules: names or a glob (``"encoder.**"``); default the self-attention modules.
            method: as for :meth:`attention`.

        Example:
            >>> from bertviz import head_view  # doctest: +SKIP
            >>> attention, tokens = st.to_bertviz(step=0)  # doctest: +SKIP
            >>> head_view(attention, tokens)  # doctest: +SKIP
        """
        from attnhooks.export.bertviz import to_bertviz

        return to_bertviz(self._at(rank), step, sample, modules=modules, call=call, method=method)

    def summary(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> dict[str, np.ndarray]:
        """The call's ``record="summary"`` reductions (see :mod:`attnhooks.reduce`), one sample:
        ``entropy``, ``sink`` ``[heads, q_len]``; ``topk_index`` / ``topk_weight`` ``[heads, q_len, K]``;
        ``band`` ``[heads, q_len, W]``; ``received`` ``[heads, k_len]``; ``pooled_max`` /
        ``pooled_mean`` ``[heads, P_q, P_k]`` and ``pooled_bins`` (rows per bin, keys per bin, P_q, P_k)."""
        st = self._at(rank)
        pos, base, meta = st._block(module, step, call, sample, None)
        if "summary" not in st._module_tables(module).leaves:
            raise NotInStoreError(f"{module!r} has no summary in this store: capture with record=('summary', ...)")
        out: dict[str, np.ndarray] = {}
        lead = (pos, call, sample)
        for name in st.backend.children(f"{base}/summary"):
            path = f"{base}/summary/{name}"
            if name in ROWWISE:
                out[name] = st.backend.read(path, (*lead, slice(None), slice(0, meta["q_len"])))
            elif name == "received":
                out[name] = st.backend.read(path, (*lead, slice(None), slice(0, meta["k_len"])))
            elif name == "pooled_bins":
                out[name] = st.backend.read(path, lead)
        if "pooled_bins" in out:
            pq, pk = (int(x) for x in out["pooled_bins"][2:])
            for name in ("pooled_max", "pooled_mean"):
                out[name] = st.backend.read(f"{base}/summary/{name}", (*lead, slice(None), slice(0, pq), slice(0, pk)))
        return out

    def call_reader(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> CallReader:
        """The :class:`~attnhooks.tiles.CallReader` of one call: masks, key counts, tiles."""
        st = self._at(rank)
        key = (module, st._position(step), sample, call)
        with st._lock:
            reader = st._readers.get(key)
            if reader is not None:
                st._readers.move_to_end(key)
                return reader
        pos, base, meta = st._block(module, step, call, sample, None)
        tables = st._module_tables(module)
        heads = int(tables.attrs.get("heads") or 1)
        kv_heads = int(tables.attrs.get("kv_heads") or heads)
        layout = CallLayout(
            base, pos, call, sample, meta, heads, kv_heads, bool(tables.attrs.get("bits")), tables.leaves
        )
        reader = CallReader(st.backend, layout)
        with st._lock:
            st._readers[key] = reader
            while len(st._readers) > _READERS:
                st._readers.popitem(last=False)
        return reader

    def q(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Queries ``[heads, q_len, head_dim]`` as the kernel received them."""
        return self._at(rank)._rows_of(module, step, call, sample, "q", "q_len")

    def k(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Keys ``[kv_heads, k_stored, head_dim]`` (positions from ``info()["k_offset"]``)."""
        return self._at(rank)._rows_of(module, step, call, sample, "k", "k_stored")

    def lse(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Row log-sum-exp of the scores ``[heads, q_len]`` (float32)."""
        return self._at(rank)._rows_of(module, step, call, sample, "lse", "q_len")

    def mask(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> dict[str, Any]:
        """The call's mask: ``causal``, ``offset`` (row i sees keys ``j <= i + offset``),
        ``window`` (None or int), ``key_valid`` (bool ``[k_len]`` or None), ``dense`` (additive
        float32 ``[heads|1, q_len, k_len]`` or None)."""
        st = self._at(rank)
        pos, base, meta = st._block(module, step, call, sample, None)
        key_valid = None
        if meta["has_key_valid"]:
            key_valid = st.backend.read(base + "/mask/key_valid", (pos, call, sample, slice(0, meta["k_len"])))
        dense = None
        if meta["dense_batch"]:
            b = sample if meta["dense_batch"] > 1 else 0
            sel = (pos, call, b, slice(0, meta["dense_heads"]), slice(0, meta["q_len"]), slice(0, meta["k_len"]))
            dense = st.backend.read(base + "/mask/dense", sel)
        return {
            "causal": bool(meta["causal"]),
            "offset": meta["mask_offset"],
            "window": None if meta["window"] < 0 else meta["window"],
            "key_valid": key_valid,
            "dense": dense,
        }

    def tokens(
        self, step: int | None = None, sample: int = 0, *, rank: int | None = None
    ) -> tuple[list[int], list[str] | None]:
        """Token ids (and strings, when stored) of one sample of ``step``; ``([], None)`` when none."""
        st = self._at(rank)
        pos = st._position(step)
        if not st.backend.contains("tokens/ids") or st.backend.shape("tokens/ids")[0] <= pos:
            return [], None
        if not 0 <= sample < st.backend.shape("tokens/ids")[1]:
            raise NotInStoreError(f"sample={sample} is out of range: step {st._steps[pos]} stored fewer samples")
        ids = st.backend.read("tokens/ids", (pos, sample))
        n = int((ids >= 0).sum())
        text = None
        if st.backend.contains("tokens/text") and st.backend.shape("tokens/text")[0] > pos:
            text = [str(t) for t in st.backend.read("tokens/text", (pos, sample, slice(0, n)))]
        return [int(i) for i in ids[:n]], text

    # -- plumbing ---------------------------------------------------------------------------------
    def _read_steps(self) -> list[int]:
        if not self.committed:
            return []
        if not self.backend.contains("steps") or self.backend.shape("steps")[0] < self.committed:
            raise NotAStoreError(f"{self.location}: committed={self.committed} but the steps array is shorter")
        return [int(s) for s in self.backend.read("steps", (slice(0, self.committed),))]

    def _module_paths(self) -> dict[str, str]:
        if self._modules is None:
            found = {}
            segments = self.backend.children("modules") if self.backend.contains("modules") else []
            for segment in segments:
                path = f"modules/{segment}"
                found[self.backend.attrs(path).get("name", unescape(segment))] = path
            self._modules = dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))
        return self._modules

    def _module_path(self, module: str) -> str:
        paths = self._module_paths()
        if module not in paths:
            near = [m for m in paths if module in m or m in module][:5] or list(paths)[:5]
            raise NotInStoreError(f"{self.location} has no module {module!r}; it has e.g. {near}")
        return paths[module]

    def _position(self, step: int | None) -> int:
        if not self._steps:
            raise NotInStoreError(f"{self.location} has no committed steps yet")
        if step is None:
            return 0
        try:
            return self._step_pos[step]
        except KeyError:
            shown = self._steps[:10] + (["..."] if len(self._steps) > 10 else [])
            raise NotInStoreError(f"{self.location} has no step {step}; its steps are {shown}") from None

    def _module_tables(self, module: str) -> _Tables:
        """The module's attributes, leaves and per-call tables over the committed steps (read once)."""
        tables = self._tables.get(module)
        if tables is None:
            tables = self._tables[module] = _Tables.read(self.backend, self._module_path(module), self.committed)
        return tables

    def _call(self, module: str, step: int | None, call: int) -> tuple[int, str]:
        base = self._module_path(module)
        pos = self._position(step)
        n = self.calls(module, step)
        if not 0 <= call < n:
            raise NotInStoreError(
                f"{module!r} has {n} call(s) at step {self._steps[pos]}; call={call} is not one of them"
            )
        return pos, base

    def _block(
        self, module: str, step: int | None, call: int, sample: int, leaf: str | None
    ) -> tuple[int, str, dict[str, Any]]:
        pos, base = self._call(module, step, call)
        leaves = self._module_tables(module).leaves
        if leaf is not None and leaf not in leaves:
            stored = [t for t in ("attn", "q", "k", "lse") if t in leaves]
            raise NotInStoreError(f"{module!r} has no {leaf!r} in this store (recorded: {stored})")
        meta = self.info(module, step, call)
        if not 0 <= sample < meta["batch"]:
            raise NotInStoreError(f"sample={sample} is out of range: the call has batch size {meta['batch']}")
        return pos, base, meta

    def _rows_of(self, module: str, step: int | None, call: int, sample: int, leaf: str, length: str) -> np.ndarray:
        """One sample's ``leaf`` (q, k or lse) of a call, its sequence axis cut to ``info()[length]``."""
        pos, base, meta = self._block(module, step, call, sample, leaf)
        sel = (pos, call, sample, slice(None), slice(0, meta[length]))
        path = f"{base}/{leaf}"
        return self.backend.read(path, sel) if leaf == "lse" else self._values(module, path, sel)

    def _values(self, module: str, path: str, sel: tuple[Any, ...]) -> np.ndarray:
        out = self.backend.read(path, sel)
        return widen_bits(out) if self._module_tables(module).attrs.get("bits") else out

    def close(self) -> None:
        self._root.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" rank {self.default_rank} of {self.ranks}" if self._set is not None else ""
        return (
            f"<attnhooks store {self.location}{where} {self.status}: {self.committed} step(s), "
            f"{len(self.modules)} module(s)>"
        )


_READERS = 64  # call readers kept (each caches its rowkeys and key padding)
_LEAVES = ("attn", "attn_stored", "q", "k", "lse", "mask/key_valid", "mask/dense", "parent", "summary")


@dataclass(frozen=True)
class _Tables:
    attrs: dict[str, Any]
    leaves: frozenset[str]
    calls: np.ndarray  # [S]
    info: np.ndarray  # [S, C, len(INFO)]
    scalars: np.ndarray  # [S, C, len(SCALARS)]

    @classmethod
    def read(cls, backend: Backend, base: str, committed: int) -> _Tables:
        leaves = frozenset(leaf for leaf in _LEAVES if backend.contains(f"{base}/{leaf}"))

        def table(name: str, tail: tuple[int, ...], dtype: str) -> np.ndarray:
            path = f"{base}/{name}"
            if not backend.contains(path):
                return np.zeros((0, *tail), dtype=dtype)
            return backend.read(path, (slice(0, min(committed, backend.shape(path)[0])),))

        return cls(
            backend.attrs(base),
            leaves,
            table("calls", (), "int64"),
            table("info", (0, len(INFO)), "int64"),
            table("scalars", (0, len(SCALARS)), "float64"),
        )


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key: ``layers.10`` after ``layers.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.replace("/", ".").split(".")]


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "no modules"
