"""Per-head means of the row metrics, accumulated over row tiles of one attention matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, check_attn, check_int
from attnhooks.analysis.entropy import entropy
from attnhooks.analysis.mass import attention_distance, next_mass, previous_mass, self_mass, sink_mass, token_class_mass
from attnhooks.analysis.tokens import punctuation, special_tokens

__all__ = ["SUMMARY_METRICS", "summarize"]

SUMMARY_METRICS = (
    "entropy",
    "entropy_normalized",
    "distance",
    "sink",
    "self",
    "previous",
    "next",
    "special",
    "punctuation",
)
"""The names :func:`summarize` returns (the last two only when tokens are given)."""

RowMetric = Callable[[Array, int, slice], Array]


def summarize(
    tiles: Iterable[tuple[slice, Array]],
    *,
    k: int,
    q_start: int = 0,
    n_keys: npt.ArrayLike | None = None,
    tokens: Sequence[str] | None = None,
    sink: int = 1,
    valid: npt.ArrayLike | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-head means over query rows of the row metrics, holding one tile of rows at a time.

    Each tile is read once (``numpy.asarray``: a dask tile is computed once), its rows' metrics
    are summed per head, and the tile is dropped. The means equal those of the per-row functions
    on the whole matrix, for any tiling.

    Args:
        tiles: ``(rows, tile)`` pairs: ``rows`` a ``slice`` of query rows (``step`` 1) and
            ``tile`` its attention ``[..., heads, len(rows), k]``. Each slice must start where the
            previous one stopped.
        k: number of keys (every tile's last axis).
        q_start: position of query row 0 among the keys; a tile's rows ``rows`` start at
            position ``q_start + rows.start``.
        n_keys: keys each row could attend, for the normalised entropy: an int, or an int array
            whose last axis runs over all query rows (:func:`valid_keys`), indexed with ``rows``;
            default ``k``.
        tokens: ``[k]`` token strings; adds ``"special"`` and ``"punctuation"`` mass.
        sink: number of leading keys counted by ``"sink"``.
        valid: bool array whose last axis runs over all query rows (broadcast against the per-row
            metrics ``[..., heads, q]``): rows where it is False are left out of the means (e.g.
            padding queries, which attend to nothing). Default: every row counts.

    Returns:
        dict name → float64 ``[..., heads]``: ``"entropy"`` (nats), ``"entropy_normalized"``,
        ``"distance"``, ``"sink"``, ``"self"``, ``"previous"``, ``"next"``, and with tokens
        ``"special"`` and ``"punctuation"``.

    Example:
        >>> import numpy as np
        >>> attn = np.full((2, 4, 4), 0.25)  # [heads=2, q=4, k=4]
        >>> tiles = [(slice(0, 3), attn[:, 0:3]), (slice(3, 4), attn[:, 3:4])]
        >>> means = summarize(tiles, k=4)
        >>> means["entropy_normalized"], means["sink"]
        (array([1., 1.]), array([0.25, 0.25]))
    """
    k = check_int(k, "k", minimum=0)
    q_start = check_int(q_start, "q_start")
    metrics = _metrics(k, n_keys, tokens, check_int(sink, "sink", minimum=0))
    keep = None if valid is None else np.asarray(valid, dtype=bool)
    sums: dict[str, npt.NDArray[np.float64]] = {}
    count: npt.NDArray[np.float64] | float = 0.0
    expected: int | None = None
    for rows, tile in tiles:
        start, expected = _check_tile(rows, tile, k, expected)
        data = np.asarray(tile)
        weight = np.ones(data.shape[:-1]) if keep is None else np.broadcast_to(keep[..., rows], data.shape[:-1])
        count = count + weight.sum(axis=-1)
        for name, metric in metrics.items():
            sums[name] = sums.get(name, 0.0) + np.where(weight, metric(data, q_start + start, rows), 0.0).sum(axis=-1)
    if expected is None or not np.any(count):
        raise AnalysisError("tiles hold no rows (or none marked valid); give at least one (rows, tile) pair with rows.")
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: total / count for name, total in sums.items()}


def _metrics(k: int, n_keys: npt.ArrayLike | None, tokens: Sequence[str] | None, sink: int) -> dict[str, RowMetric]:
    """The row metrics as ``f(tile, position of its row 0, its rows slice) -> [..., heads, r]``."""
    counts = None if n_keys is None else np.asarray(n_keys)

    def normalized(tile: Array, start: int, rows: slice) -> Array:
        n = k if counts is None or counts.ndim == 0 else counts[..., rows]
        return entropy(tile, normalize=True, n_keys=n)

    metrics: dict[str, RowMetric] = {
        "entropy": lambda tile, start, rows: entropy(tile),
        "entropy_normalized": normalized,
        "distance": lambda tile, start, rows: attention_distance(tile, q_start=start),
        "sink": lambda tile, start, rows: sink_mass(tile, sink),
        "self": lambda tile, start, rows: self_mass(tile, q_start=start),
        "previous": lambda tile, start, rows: previous_mass(tile, q_start=start),
        "next": lambda tile, start, rows: next_mass(tile, q_start=start),
    }
    if tokens is not None:
        if len(tokens) != k:
            raise AnalysisError(f"tokens must give one token per key (k={k}); got {len(tokens)}.")
        metrics["special"] = _class_metric(special_tokens(tokens))
        metrics["punctuation"] = _class_metric(punctuation(tokens))
    return metrics


def _class_metric(flags: npt.NDArray[np.bool_]) -> RowMetric:
    return lambda tile, start, rows: token_class_mass(tile, flags)


def _check_tile(rows: slice, tile: Array, k: int, expected: int | None) -> tuple[int, int]:
    """``(start, stop)`` of a tile's rows, after checking the slice against the tile and its place."""
    if not isinstance(rows, slice) or rows.start is None or rows.stop is None or rows.step not in (None, 1):
        raise AnalysisError(f"each tile's rows must be a slice(start, stop) with step 1; got {rows!r}.")
    start = check_int(rows.start, "rows.start", minimum=0)
    stop = check_int(rows.stop, "rows.stop", minimum=start)
    check_attn(tile, ndim=3, name="tile", layout="[..., heads, rows, k]")
    if tuple(tile.shape[-2:]) != (stop - start, k):
        raise AnalysisError(f"tile for rows {start}:{stop} must end in [{stop - start}, {k}]; got {tuple(tile.shape)}.")
    if expected is not None and start != expected:
        raise AnalysisError(
            f"tiles must cover consecutive rows: this one starts at {start}, the last stopped at {expected}."
        )
    return start, stop
