"""Reading stores: :func:`open_store` and :class:`Store`.

The reader needs numpy and a backend only (no torch, no model). Opening reads the root metadata;
arrays are read when asked for, one call's block at a time. Only the first ``committed`` steps
exist: a store whose writer was killed opens and shows exactly those.

:class:`Store` is the facade: what a store holds is its :class:`~attnhooks.read.catalog.Catalog`'s
to say, the ranks of a rank set are a :class:`~attnhooks.read.ranksets.RankSet`'s, and the tensor
reads (attention, q, k, lse, masks, summaries, tokens) come from
:class:`~attnhooks.read.reads.TensorReads`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

from attnhooks.backends.base import Backend, backend_for
from attnhooks.backends.stacks import stacked_view
from attnhooks.backends.subtree import LAYOUT
from attnhooks.errors import AttnHooksError, NotAStoreError, NotInStoreError, StoreOptionError
from attnhooks.read.catalog import Catalog
from attnhooks.read.integrity import CheckedBackend
from attnhooks.read.ranksets import RankSet
from attnhooks.read.reads import TensorReads
from attnhooks.schema import SUPPORTED

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
    if not isinstance(location, (str, os.PathLike)):
        raise StoreOptionError(
            f"open_store({location!r}): give the store's location, a path ending in .zarr, .h5 or .hdf5 or a URL "
            "(s3://bucket/run.zarr, memory://run)"
        )
    text = os.fspath(location)
    try:
        be = backend_for(text, backend).open(text, mode)
    except AttnHooksError:
        raise
    except OSError as err:
        raise NotAStoreError(f"cannot open {text} as a store: {err}") from err
    return Store(be)


class Store(TensorReads):
    """An attnhooks store, read through its backend. See :func:`open_store`.

    A store written under ``torch.distributed`` is a rank set (:mod:`attnhooks.backends.subtree`): every
    method then reads the lowest rank unless given ``rank=``; :attr:`ranks` lists the ranks and
    :meth:`rank` gives one rank's store.
    """

    def __init__(self, backend: Backend, *, _set: RankSet[Store] | None = None) -> None:
        super().__init__()
        self._root = backend
        self.backend = backend
        self.location = backend.location
        self._set = _set  # the rank set this store reads a rank of (also for the set's own store), or None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the root metadata (a store still being written may have committed more steps;
        a rank set may have gained ranks): afterwards the store shows what is committed now."""
        reopen = getattr(self._root, "refresh", None)  # optional: a backend that caches metadata
        if reopen is not None and hasattr(self, "metadata"):
            reopen()
        attrs = _checked(self._root.attrs(""), self.location)
        if attrs.get("layout") == LAYOUT:
            if self._set is None or self._set.head is not self:
                self._set = RankSet(self._root, self.location, self, _open_rank)
            else:
                self._set.refresh()
            lowest = self._set.lowest()
            if lowest is not None:
                self.backend = lowest
                attrs = _checked(self.backend.attrs(""), self.location)
            else:
                attrs = {**attrs, "rank": 0}  # no rank has started writing yet: an empty store
        plain = getattr(self.backend, "unwrapped", self.backend)
        self.backend = stacked_view(plain, int(attrs.get("committed", 0)))  # attnhooks/2 stacks
        self.metadata: dict[str, Any] = attrs
        self.committed = int(attrs.get("committed", 0))
        # reads of a damaged or missing chunk of a call's tensors raise, naming the step
        self.data = cast(Backend, CheckedBackend(self.backend, lambda: self.catalog.steps))
        self.catalog = Catalog(self.backend, self.location, self.committed)  # what this store (rank) holds
        self._readers.clear()

    # -- ranks ----------------------------------------------------------------------------------
    @property
    def ranks(self) -> list[int]:
        """The ranks whose captures the store holds: ``[0]`` (or the writer's rank) for a store of
        one process, every rank that has started writing for a rank set."""
        return [self.default_rank] if self._set is None else list(self._set.ids)

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
        if self._set is not None:
            return self._set.rank(rank)
        if rank != self.default_rank:
            raise NotInStoreError(f"{self.location} has no rank {rank}; its ranks are {self.ranks}")
        return self

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
        return list(self.catalog.steps)

    def has_step(self, step: int) -> bool:
        """True when ``step`` is one of the committed steps."""
        return self.catalog.has_step(step)

    @property
    def modules(self) -> list[str]:
        """Names of the modules with records, in model order when layer indices are known."""
        return self.catalog.modules

    def module_path(self, module: str, *, rank: int | None = None) -> str:
        """The path of the module's group in the backend (``modules/<escaped name>``).

        Raises:
            NotInStoreError: the store has no such module (the message names some it has).
        """
        return self._at(rank).catalog.module_path(module)

    def self_attention(self) -> list[str]:
        """The modules whose calls are self-attention (``kind == "self"``), in model order."""
        return self.catalog.of_kind("self")

    def select(self, modules: str | Sequence[str] | None = None, *, kind: str = "self") -> list[str]:
        """Module names, in model order, from names or globs (capture's rules: ``*`` stays within a
        dotted segment, ``**`` spans segments), or None: every module of ``kind`` ("self" or
        "cross"), all modules when none is of that kind."""
        return self.catalog.select(modules, kind=kind)

    def resolve(self, module: str | int | None = None) -> str:
        """One module name from a name, a glob (its first match), an index into the self-attention
        modules (the layer; negative counts from the last), or None (the first layer)."""
        return self.catalog.resolve(module)

    def module_info(self, module: str, *, rank: int | None = None) -> dict[str, Any]:
        """The module's attributes: kind, heads, kv_heads, head_dim, scale, causal, dtype, layer, ..."""
        return dict(self._at(rank).catalog.tables(module).attrs)

    def calls(self, module: str, step: int | None = None, *, rank: int | None = None) -> int:
        """Number of calls of ``module`` stored for ``step`` (0 when it was not called)."""
        return self._at(rank).catalog.calls(module, step)

    def info(self, module: str, step: int | None = None, call: int = 0, *, rank: int | None = None) -> dict[str, Any]:
        """Sizes, offsets and mask flags of one call (the ``info`` and ``scalars`` columns)."""
        return self._at(rank).catalog.info(module, step, call)

    # -- exporters --------------------------------------------------------------------------------
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

    # -- plumbing ---------------------------------------------------------------------------------
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


def _open_rank(backend: Backend, ranks: RankSet[Store]) -> Store:
    """The store of one rank of the set ``ranks``, from that rank's backend."""
    return Store(backend, _set=ranks)


def _checked(attrs: dict[str, Any], location: str) -> dict[str, Any]:
    """A store's root attributes, once their schema is one this version reads."""
    schema = attrs.get("schema")
    if schema is None:
        raise NotAStoreError(f"{location} is not an attnhooks store (its root has no 'schema' attribute)")
    if schema not in SUPPORTED:
        raise NotAStoreError(
            f"{location} has schema {schema!r}; this attnhooks reads {', '.join(SUPPORTED)}: upgrade attnhooks"
        )
    return attrs
