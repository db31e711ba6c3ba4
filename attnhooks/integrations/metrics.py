"""Per-head metrics of one captured step, from the records the capture kept in memory.

The records are on the CPU already (the capture copies them there); each sequence of each forward
is reduced with :func:`attnhooks.analysis.heads.sequence_metrics` (numpy: the same definitions the
offline analysis uses) after cropping it to its real tokens (``attention_mask``), and the per-sequence
values are averaged (NaN-aware: a sequence without a repeated token has no induction score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from attnhooks.analysis.heads import sequence_metrics
from attnhooks.capturing.record import Record

__all__ = ["Forward", "StepMetrics", "step_metrics"]


@dataclass
class Forward:
    """One top-level forward of a captured step: where its records start and what it was given.

    Attributes:
        first: index in the capture's records of the forward's first record.
        ids: ``[batch, len]`` token ids, or None when the forward got none.
        mask: ``[batch, len]`` attention mask (1 = a real token), or None.
    """

    first: int
    ids: npt.NDArray[np.int64] | None = None
    mask: npt.NDArray[np.int64] | None = None


@dataclass
class StepMetrics:
    """The metrics of one captured step.

    Attributes:
        step: the trainer's global step.
        phase: ``"train"`` or ``"eval"``.
        modules: the attention modules in call order (the rows: layer 0 first).
        values: metric name -> float64 ``[layers, heads]`` (NaN where a layer has fewer heads, or a
            metric had nothing to score).
    """

    step: int
    phase: str
    modules: list[str]
    values: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    def scalars(self, prefix: str) -> dict[str, float]:
        """``{"<prefix>/<metric>/L<layer>H<head>": value}`` for every finite value."""
        out = {}
        for name, grid in self.values.items():
            for layer, head in zip(*np.nonzero(np.isfinite(grid)), strict=True):
                out[f"{prefix}/{name}/L{layer}H{head}"] = float(grid[layer, head])
        return out


def step_metrics(
    records: Sequence[Record],
    forwards: Sequence[Forward],
    metrics: Sequence[str],
    step: int,
    phase: str,
    samples: int | None = None,
) -> StepMetrics:
    """Average each metric per module and head over the sequences of a step's forwards.

    Args:
        records: the step's records, in call order.
        forwards: the step's top-level forwards, in order (``first`` indexes ``records``).
        metrics: names from :data:`attnhooks.analysis.heads.HEAD_METRICS`.
        step: the trainer's global step.
        phase: ``"train"`` or ``"eval"``.
        samples: use at most this many sequences of each forward (None: all).

    Returns:
        A :class:`StepMetrics` (its ``values`` empty when no record has ``attn``).
    """
    per_module: dict[str, dict[str, list[npt.NDArray[np.float64]]]] = {}
    starts = [f.first for f in forwards]
    for index, rec in enumerate(records):
        if rec.attn is None or rec.kind != "self":
            continue
        slot = int(np.searchsorted(starts, index, side="right")) - 1
        forward = forwards[slot] if slot >= 0 else Forward(0)
        sink = per_module.setdefault(rec.module, {m: [] for m in metrics})
        attn = rec.attn.numpy()
        n = attn.shape[0] if samples is None else min(samples, attn.shape[0])
        whole = [b for b in range(n) if not _padded(forward, b, attn.shape[-1])]
        if whole:  # the sequences without padding, in one batched call
            batch = attn[:n] if len(whole) == n else attn[whole]
            ids = _ids(forward, whole, attn.shape[-1])
            for name, value in sequence_metrics(batch, metrics, ids).items():
                sink[name].extend(value)
        for b in sorted(set(range(n)) - set(whole)):
            seq, tokens = _sequence(attn[b], forward, b)
            if seq.shape[-1] == 0 or seq.shape[-2] == 0:
                continue
            for name, value in sequence_metrics(seq, metrics, tokens).items():
                sink[name].append(value)
    modules = list(per_module)
    heads = max((v[0].shape[0] for m in per_module.values() for v in m.values() if v), default=0)
    values = {}
    for name in metrics:
        grid = np.full((len(modules), heads), np.nan)
        for row, module in enumerate(modules):
            found = per_module[module][name]
            if found:
                stacked = np.stack(found)
                with np.errstate(invalid="ignore"):
                    counts = np.isfinite(stacked).sum(axis=0)
                    total = np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=0)
                grid[row, : stacked.shape[1]] = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
        values[name] = grid
    return StepMetrics(step, phase, modules, values)


def _padded(forward: Forward, b: int, k: int) -> bool:
    """True when sequence ``b`` of the forward has padding (its ``attention_mask`` row holds a 0)."""
    mask = forward.mask
    return mask is not None and mask.shape[-1] == k and b < mask.shape[0] and not bool(mask[b].all())


def _ids(forward: Forward, rows: list[int], k: int) -> npt.NDArray[np.int64] | None:
    """The token ids ``[len(rows), k]`` of those sequences, or None when the forward got none of length ``k``."""
    if forward.ids is None or forward.ids.shape[-1] != k or max(rows) >= forward.ids.shape[0]:
        return None
    return forward.ids[: len(rows)] if rows == list(range(len(rows))) else forward.ids[rows]


def _sequence(
    attn: npt.NDArray[np.float32], forward: Forward, b: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    """Sequence ``b`` of a call ``[heads, q, k]`` cropped to its real tokens (``attention_mask``), and their ids."""
    k = attn.shape[-1]
    ids = _ids(forward, [b], k)
    keep = np.flatnonzero(forward.mask[b] != 0) if forward.mask is not None else np.arange(k)
    if attn.shape[-2] != k:  # rows that are not the keys' positions: nothing to crop them by
        return attn, None if ids is None else ids[0]
    return attn[:, keep][:, :, keep], None if ids is None else ids[0][keep]
