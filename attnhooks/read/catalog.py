"""What one store holds: its committed steps, its modules and each module's per-call tables.

A :class:`Catalog` reads one store's (or one rank's) ``steps`` array and module groups when it is
made, and each module's ``calls`` / ``info`` / ``scalars`` tables once, on first use. It answers
where a call lives (:meth:`Catalog.layout`) and refuses, with :class:`NotInStoreError`, a step, a
module, a call or a sample the store does not hold, naming what it does hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend
from attnhooks.errors import NotAStoreError, NotInStoreError
from attnhooks.names import match_names
from attnhooks.read.tiles import CallLayout
from attnhooks.schema import INFO, SCALARS, unescape

__all__ = ["Catalog", "ModuleTables"]

LEAVES = ("attn", "attn_stored", "q", "k", "lse", "mask/key_valid", "mask/dense", "parent", "summary")
"""The arrays a module's group may hold (:attr:`ModuleTables.leaves` is those it does)."""


@dataclass(frozen=True)
class ModuleTables:
    """One module's attributes, the arrays it stored, and its per-call tables over the committed
    steps ``S`` (``C`` the most calls of a step)."""

    attrs: dict[str, Any]
    leaves: frozenset[str]
    calls: np.ndarray  # [S]
    info: np.ndarray  # [S, C, len(INFO)]
    scalars: np.ndarray  # [S, C, len(SCALARS)]

    @classmethod
    def read(cls, backend: Backend, base: str, committed: int) -> ModuleTables:
        """Read the tables of the module group ``base``, cut to the first ``committed`` steps."""
        leaves = frozenset(leaf for leaf in LEAVES if backend.contains(f"{base}/{leaf}"))

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


class Catalog:
    """The steps and modules of one store (one rank of a rank set) over its ``committed`` steps.

    Args:
        backend: the store's (or the rank's) backend.
        location: where the store is, for messages.
        committed: how many steps exist (the root's ``committed`` attribute).

    Raises:
        NotAStoreError: ``committed`` counts more steps than the ``steps`` array holds.

    Example:
        >>> catalog = Catalog(backend, "memory://run", committed=2)  # doctest: +SKIP
        >>> catalog.steps, catalog.position(7), catalog.module_path("layers.0.attn")  # doctest: +SKIP
        ([3, 7], 1, 'modules/layers.0.attn')
    """

    def __init__(self, backend: Backend, location: str, committed: int) -> None:
        self.backend = backend
        self.location = location
        self.committed = committed
        self.steps: list[int] = self._read_steps()
        """User step ids of the committed steps, in the order they were written."""
        self._position = {step: pos for pos, step in reversed(list(enumerate(self.steps)))}
        self._paths: dict[str, str] | None = None
        self._tables: dict[str, ModuleTables] = {}

    # -- steps ------------------------------------------------------------------------------------
    def _read_steps(self) -> list[int]:
        if not self.committed:
            return []
        if not self.backend.contains("steps") or self.backend.shape("steps")[0] < self.committed:
            raise NotAStoreError(f"{self.location}: committed={self.committed} but the steps array is shorter")
        return [int(s) for s in self.backend.read("steps", (slice(0, self.committed),))]

    def has_step(self, step: int) -> bool:
        """True when ``step`` is one of the committed steps."""
        return step in self._position

    def position(self, step: int | None) -> int:
        """Where ``step`` is among the committed steps (its first occurrence); None: the first step.

        Raises:
            NotInStoreError: no step is committed yet, or ``step`` is not one of them.
        """
        if not self.steps:
            raise NotInStoreError(f"{self.location} has no committed steps yet")
        if step is None:
            return 0
        try:
            return self._position[step]
        except KeyError:
            shown = self.steps[:10] + (["..."] if len(self.steps) > 10 else [])
            raise NotInStoreError(f"{self.location} has no step {step}; its steps are {shown}") from None

    # -- modules ----------------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Names of the modules with records, in model order when layer indices are known."""
        return list(self.module_paths())

    def module_paths(self) -> dict[str, str]:
        """Each module's name and the path of its group (``modules/<escaped name>``), in model order."""
        if self._paths is None:
            found = {}
            segments = self.backend.children("modules") if self.backend.contains("modules") else []
            for segment in segments:
                path = f"modules/{segment}"
                found[self.backend.attrs(path).get("name", unescape(segment))] = path
            self._paths = dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))
        return self._paths

    def module_path(self, module: str) -> str:
        """The path of ``module``'s group.

        Raises:
            NotInStoreError: the store has no such module (the message names some it has).
        """
        paths = self.module_paths()
        if module not in paths:
            near = [m for m in paths if module in m or m in module][:5] or list(paths)[:5]
            raise NotInStoreError(f"{self.location} has no module {module!r}; it has e.g. {near}")
        return paths[module]

    def tables(self, module: str) -> ModuleTables:
        """The module's attributes, leaves and per-call tables over the committed steps (read once)."""
        tables = self._tables.get(module)
        if tables is None:
            tables = self._tables[module] = ModuleTables.read(self.backend, self.module_path(module), self.committed)
        return tables

    def of_kind(self, kind: str) -> list[str]:
        """The modules whose calls are of ``kind`` (``"self"`` or ``"cross"``), in model order."""
        return [m for m in self.modules if self.tables(m).attrs.get("kind") == kind]

    def select(self, modules: str | Sequence[str] | None = None, *, kind: str = "self") -> list[str]:
        """See :meth:`attnhooks.read.store.Store.select`."""
        if modules is not None and (
            not isinstance(modules, (str, Sequence)) or not all(isinstance(m, str) for m in modules)
        ):
            raise NotInStoreError(
                f"modules={modules!r}: give a module name or glob, a list of them, or None; "
                f"{self.location} holds {_listing(self.modules)}"
            )
        names = (self.of_kind(kind) or self.modules) if modules is None else match_names(self.modules, modules)
        if not names:
            raise NotInStoreError(f"modules={modules!r} matches no module of {self.location}: {_listing(self.modules)}")
        return names

    def resolve(self, module: str | int | None = None) -> str:
        """See :meth:`attnhooks.read.store.Store.resolve`."""
        layers = self.select()
        if module is None:
            return layers[0]
        if isinstance(module, (int, np.integer)) or str(module).lstrip("-").isdigit():
            index = int(module)
            if not -len(layers) <= index < len(layers):
                raise NotInStoreError(f"layer {index} is out of range: {self.location} has {len(layers)} layers")
            return layers[index]
        return self.select(module)[0]

    # -- calls ------------------------------------------------------------------------------------
    def calls(self, module: str, step: int | None = None) -> int:
        """Number of calls of ``module`` stored for ``step`` (0 when it was not called)."""
        pos = self.position(step)
        calls = self.tables(module).calls
        return int(calls[pos]) if pos < calls.size else 0

    def info(self, module: str, step: int | None = None, call: int = 0) -> dict[str, Any]:
        """Sizes, offsets and mask flags of one call (its ``info`` and ``scalars`` columns)."""
        pos = self._call(module, step, call)
        return self._row(module, pos, call)

    def layout(self, module: str, step: int | None, sample: int, call: int, *, leaf: str | None = None) -> CallLayout:
        """Where one call's arrays live and its ``info`` row, for one sample.

        Raises:
            NotInStoreError: no such module, step, call or sample, or (given ``leaf``) the module
                did not store that array.
        """
        pos = self._call(module, step, call)
        tables = self.tables(module)
        if leaf is not None and leaf not in tables.leaves:
            stored = [t for t in ("attn", "q", "k", "lse") if t in tables.leaves]
            raise NotInStoreError(f"{module!r} has no {leaf!r} in this store (recorded: {stored})")
        info = self._row(module, pos, call)
        if not 0 <= sample < info["batch"]:
            raise NotInStoreError(f"sample={sample} is out of range: the call has batch size {info['batch']}")
        heads = int(tables.attrs.get("heads") or 1)
        kv_heads = int(tables.attrs.get("kv_heads") or heads)
        bits = bool(tables.attrs.get("bits"))
        return CallLayout(self.module_path(module), pos, call, sample, info, heads, kv_heads, bits, tables.leaves)

    def _call(self, module: str, step: int | None, call: int) -> int:
        """The position of ``step``, once ``module`` is known to have made call ``call`` there."""
        self.module_path(module)
        pos = self.position(step)
        n = self.calls(module, step)
        if not 0 <= call < n:
            raise NotInStoreError(
                f"{module!r} has {n} call(s) at step {self.steps[pos]}; call={call} is not one of them"
            )
        return pos

    def _row(self, module: str, pos: int, call: int) -> dict[str, Any]:
        tables = self.tables(module)
        out: dict[str, Any] = {name: int(v) for name, v in zip(INFO, tables.info[pos, call])}
        out.update({name: float(v) for name, v in zip(SCALARS, tables.scalars[pos, call])})
        return out


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key: ``layers.10`` after ``layers.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.replace("/", ".").split(".")]


def _listing(names: Sequence[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "no modules"
