"""Head metrics of a whole store: every module and head of one call, streamed over row tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError
from attnhooks.analysis.summarize import summarize

__all__ = ["HeadTable", "head_table"]


@dataclass
class HeadTable:
    """Per-head metrics of several modules: ``metrics[name]`` is float64 ``[modules, heads]``."""

    modules: list[str]
    metrics: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    def top(self, metric: str, n: int = 5) -> list[tuple[str, int, float]]:
        """The ``n`` heads with the largest ``metric``: ``(module, head, value)``, largest first."""
        values = self._metric(metric)
        order = np.argsort(values, axis=None)[::-1][:n]
        return [(self.modules[i // values.shape[1]], int(i % values.shape[1]), float(values.flat[i])) for i in order]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (module, head): ``{"module", "layer", "head", <metric>: value, ...}``."""
        out = []
        for m, module in enumerate(self.modules):
            heads = next(iter(self.metrics.values())).shape[1] if self.metrics else 0
            for h in range(heads):
                row: dict[str, Any] = {"module": module, "layer": m, "head": h}
                row.update({name: float(values[m, h]) for name, values in self.metrics.items()})
                out.append(row)
        return out

    def _metric(self, name: str) -> npt.NDArray[np.float64]:
        if name not in self.metrics:
            raise AnalysisError(f"no metric {name!r}; this table has {sorted(self.metrics)}")
        return self.metrics[name]


def head_table(
    store: Any,
    step: int | None = None,
    sample: int = 0,
    *,
    modules: Sequence[str] | None = None,
    call: int = 0,
    tile: int = 512,
    sink: int = 1,
    tokens: Sequence[str] | bool | None = True,
    method: str = "auto",
) -> HeadTable:
    """Per-head means of the row metrics of :func:`summarize` for every module of a store.

    Each module's attention is read (or rebuilt from q/k/lse) ``tile`` query rows at a time, so a
    long sequence never sits in memory whole. The normalised entropy uses the keys each row could
    attend (its mask), and distances the rows' own positions (KV-cache rows included). Rows that
    may attend no key (padding queries) are left out of the means.

    Args:
        store: an :class:`attnhooks.Store`.
        step, sample, call: which call of each module.
        modules: names (default: every self-attention module, in model order).
        tile: query rows per tile.
        sink: leading keys counted by ``"sink"``.
        tokens: token strings of the keys; True reads them from the store when it has them
            (adds ``"special"`` and ``"punctuation"`` mass), False or None leaves them out.
        method: ``"auto"``, ``"stored"`` or ``"reconstructed"`` (see :meth:`Store.attention`).

    Example:
        >>> table = head_table(attnhooks.open_store("run.zarr"))  # doctest: +SKIP
        >>> table.top("sink", 3)  # doctest: +SKIP
    """
    names: list[str] = store.select(modules)
    per_module = []
    for name in names:
        reader = store.call_reader(name, step, sample, call)
        heads = np.arange(reader.layout.heads)
        n_keys = (
            np.concatenate([reader.key_counts(heads, rows) for rows, _ in _row_slices(reader.q_len, tile)], axis=-1)
            if reader.q_len
            else np.zeros((heads.size, 0), dtype=np.int64)
        )
        keys = _tokens(store, step, sample, reader.k_len, tokens)
        tiles = store.row_tiles(name, step, sample, call, tile=tile, method=method)
        per_module.append(
            summarize(
                tiles,
                k=reader.k_len,
                q_start=reader.query_start(),
                n_keys=n_keys,
                tokens=keys,
                sink=sink,
                valid=n_keys > 0,  # padding queries attend to nothing: left out of the means
            )
        )
    metrics = {key: np.stack([m[key] for m in per_module]) for key in per_module[0]} if per_module else {}
    return HeadTable(names, metrics)


def _row_slices(n: int, tile: int) -> list[tuple[slice, None]]:
    return [(slice(s, min(s + tile, n)), None) for s in range(0, n, max(1, tile))]


def _tokens(store: Any, step: int | None, sample: int, k: int, tokens: Sequence[str] | bool | None) -> list[str] | None:
    if tokens is True:
        _, text = store.tokens(step, sample)
        return list(text[:k]) if text is not None and len(text) >= k else None
    if tokens is False or tokens is None:
        return None
    return list(tokens)
