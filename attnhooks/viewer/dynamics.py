"""Head dynamics: one metric per layer x head across training steps, the phase change easy to see.

Three sources give the same :class:`Dynamics` table (steps x layers x heads):

* :func:`dynamics_from_store`: a store with many steps (a training callback's, or any capture's):
  each step's attention is read back exactly and reduced with
  :func:`attnhooks.analysis.heads.sequence_metrics` (the definitions the callbacks log).
* :func:`dynamics_from_history`: the callback's ``history`` (its logged metrics, in memory).
* :func:`dynamics_from_tensorboard`: the scalars a callback logged to TensorBoard
  (``attnhooks/<metric>/L<layer>H<head>``; needs ``tensorboard``), and the trainer's loss beside them.

:func:`dynamics_view` draws small multiples (one panel per layer, a line per head) above a
step x head heatmap, with the loss when known. No torch and no model are needed.

Example:
    >>> import numpy as np
    >>> from attnhooks.viewer.dynamics import Dynamics, dynamics_view
    >>> d = Dynamics("induction", np.array([0, 10, 20]), ["layer0", "layer1"], np.random.rand(3, 2, 4))
    >>> fig = dynamics_view(d)
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from attnhooks.analysis.heads import HEAD_METRICS, check_metrics, sequence_metrics
from attnhooks.errors import AnalysisError, ViewError
from attnhooks.read.store import Store

__all__ = [
    "Dynamics",
    "dynamics_from_history",
    "dynamics_from_store",
    "dynamics_from_tensorboard",
    "dynamics_view",
    "render_dynamics",
]

_TAG = re.compile(r"^(?P<prefix>[^/]+)/(?P<metric>[^/]+)/L(?P<layer>\d+)H(?P<head>\d+)$")


@dataclass
class Dynamics:
    """One metric per layer x head across steps.

    Attributes:
        metric: the metric's name (:data:`attnhooks.analysis.heads.HEAD_METRICS`).
        steps: int64 ``[steps]``, increasing.
        layers: a label per layer (module names, or ``L0``, ``L1``...).
        values: float64 ``[steps, layers, heads]`` (NaN where nothing was measured).
        loss: ``(steps, values)`` of the training loss when known, else None.
    """

    metric: str
    steps: npt.NDArray[np.int64]
    layers: list[str]
    values: npt.NDArray[np.float64]
    loss: tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None = None

    def strongest(self, top: int = 1) -> list[tuple[int, int]]:
        """``(layer, head)`` of the ``top`` heads whose metric rises most from the first step to the last."""
        if self.values.shape[0] == 0:
            return []
        rise = np.nan_to_num(self.values[-1] - self.values[0], nan=-np.inf).ravel()
        heads = self.values.shape[2]
        return [(int(i) // heads, int(i) % heads) for i in np.argsort(-rise, kind="stable")[:top]]


def dynamics_from_store(
    store: Store,
    metric: str,
    *,
    modules: str | Sequence[str] | None = None,
    samples: int | None = None,
    steps: Iterable[int] | None = None,
) -> Dynamics:
    """The metric of every stored step, per layer x head, from the attention read back exactly.

    The last call of each step is read (the store keeps the token ids of a step's last forward,
    which ``induction`` needs), its first ``samples`` sequences (None: all) averaged, NaN-aware.

    Args:
        store: an open :class:`~attnhooks.read.store.Store`.
        metric: a name of :data:`~attnhooks.analysis.heads.HEAD_METRICS`.
        modules: self-attention modules (names or globs; default all, in store order).
        samples: sequences per step to average (None: every sequence of the call).
        steps: the steps to read (default: every stored step).
    """
    _check(metric)
    chosen = store.select(modules)
    wanted = list(store.steps if steps is None else steps)
    if not chosen or not wanted:
        raise ViewError(f"the store holds no self-attention module or step to draw (modules={modules!r})")
    heads = max(int(store.module_info(m)["heads"]) for m in chosen)
    values = np.full((len(wanted), len(chosen), heads), np.nan)
    for i, step in enumerate(wanted):
        for j, module in enumerate(chosen):
            call = store.calls(module, step) - 1
            batch = int(store.info(module, step, call)["batch"])
            found = []
            for sample in range(batch if samples is None else min(samples, batch)):
                ids, _ = store.tokens(step, sample)
                attn = store.attention(module, step, sample, call)
                k = attn.shape[-1]
                tokens = np.asarray(ids[:k]) if len(ids) >= k else None
                found.append(sequence_metrics(attn, (metric,), tokens)[metric])
            if found:
                stacked = np.stack(found)
                with np.errstate(invalid="ignore"):
                    mean = (
                        np.nanmean(np.where(np.isfinite(stacked), stacked, np.nan), axis=0) if _any(stacked) else None
                    )
                if mean is not None:
                    values[i, j, : mean.shape[0]] = mean
    return Dynamics(metric, np.asarray(wanted, dtype=np.int64), chosen, values)


def dynamics_from_history(history: Sequence[Any], metric: str, *, phase: str = "train") -> Dynamics:
    """The metric of a training callback's ``history`` (its :class:`StepMetrics`, in memory).

    Args:
        history: objects with ``step``, ``phase``, ``modules`` and ``values`` (name -> ``[layers, heads]``).
        metric: the metric to draw.
        phase: ``"train"`` or ``"eval"``.
    """
    _check(metric)
    rows = [h for h in history if h.phase == phase and metric in h.values]
    if not rows:
        raise ViewError(f"the history holds no {phase} step with metric {metric!r}")
    layers = max((list(h.modules) for h in rows), key=len)
    heads = max(h.values[metric].shape[1] for h in rows)
    values = np.full((len(rows), len(layers), heads), np.nan)
    for i, h in enumerate(rows):
        grid = h.values[metric]
        values[i, : grid.shape[0], : grid.shape[1]] = grid
    order = np.argsort([h.step for h in rows], kind="stable")
    return Dynamics(metric, np.asarray([rows[i].step for i in order], dtype=np.int64), layers, values[order])


def dynamics_from_tensorboard(
    log_dir: str | os.PathLike[str], metric: str, *, prefix: str = "attnhooks", loss: str | None = "train/loss"
) -> Dynamics:
    """The metric's per-head scalars logged by a training callback to TensorBoard under ``log_dir``.

    Args:
        log_dir: a directory holding event files (searched recursively; each run is read).
        metric: the metric to draw.
        prefix: ``"attnhooks"`` (training steps) or ``"attnhooks_eval"``.
        loss: the tag of the loss to draw beside (``"train/loss"`` for the Hugging Face Trainer), or
            None; a missing tag draws no loss.
    """
    _check(metric)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ViewError("reading TensorBoard logs needs tensorboard: pip install 'attnhooks[tensorboard]'") from err
    found: dict[tuple[int, int], dict[int, float]] = {}
    losses: dict[int, float] = {}
    runs = sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)}
    )
    for run in runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            match = _TAG.match(tag)
            if match and match["prefix"] == prefix and match["metric"] == metric:
                cell = found.setdefault((int(match["layer"]), int(match["head"])), {})
                cell.update({e.step: e.value for e in acc.Scalars(tag)})
            elif loss is not None and tag == loss:
                losses.update({e.step: e.value for e in acc.Scalars(tag)})
    if not found:
        raise ViewError(
            f"no scalar '{prefix}/{metric}/L<layer>H<head>' in the event files under {os.fspath(log_dir)!r}"
        )
    steps = sorted({s for cell in found.values() for s in cell})
    layers = 1 + max(layer for layer, _ in found)
    values = np.full((len(steps), layers, 1 + max(head for _, head in found)), np.nan)
    index = {s: i for i, s in enumerate(steps)}
    for (layer, head), cell in found.items():
        for step, value in cell.items():
            values[index[step], layer, head] = value
    curve = None
    if losses:
        at = sorted(losses)
        curve = (np.asarray(at, dtype=np.int64), np.asarray([losses[s] for s in at], dtype=np.float64))
    return Dynamics(metric, np.asarray(steps, dtype=np.int64), [f"L{i}" for i in range(layers)], values, curve)


def dynamics_view(dynamics: Dynamics, *, highlight: int = 2, figsize: tuple[float, float] | None = None) -> Figure:
    """Small multiples (one panel per layer: the metric of each head against the step), a step x head
    heatmap of every layer, and the loss on a second axis of the heatmap when known.

    Args:
        dynamics: what to draw.
        highlight: the heads whose metric rises most are drawn thick and named in the legend.
        figsize: inches (default from the number of layers).

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    d = dynamics
    n_steps, layers, heads = d.values.shape
    if n_steps == 0 or layers == 0:
        raise ViewError("nothing to draw: the dynamics hold no step or no layer")
    strong = set(d.strongest(highlight))
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig = Figure(figsize=figsize or (3.2 * cols, 2.4 * rows + 2.8), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [1.15])
    palette = [f"C{i % 10}" for i in range(heads)]
    for layer in range(layers):
        ax = fig.add_subplot(grid[layer // cols, layer % cols])
        for head in range(heads):
            thick = (layer, head) in strong
            ax.plot(
                d.steps,
                d.values[:, layer, head],
                color=palette[head],
                lw=2.2 if thick else 0.9,
                alpha=1.0 if thick else 0.55,
                label=f"head {head}" + (" *" if thick else ""),
            )
        ax.set_title(d.layers[layer], fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel(d.metric, fontsize=7)
        ax.tick_params(labelsize=6)
        if heads <= 12:
            ax.legend(fontsize=5, ncols=2, loc="best")
    ax = fig.add_subplot(grid[rows, :])
    flat = d.values.reshape(n_steps, layers * heads).T
    edges = _edges(d.steps)
    mesh = ax.pcolormesh(edges, np.arange(layers * heads + 1) - 0.5, flat, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label=d.metric, pad=0.08 if d.loss is not None else 0.02)
    ax.set_yticks(range(layers * heads), [f"L{i // heads}H{i % heads}" for i in range(layers * heads)], fontsize=5)
    ax.invert_yaxis()  # layer 0 head 0 on top
    ax.set_xlabel("step", fontsize=7)
    ax.set_title(f"{d.metric} per head (rows) across steps", fontsize=8)
    if d.loss is not None:
        twin = ax.twinx()
        twin.plot(d.loss[0], d.loss[1], color="white", lw=1.2)
        twin.plot(d.loss[0], d.loss[1], color="crimson", lw=0.8, label="loss")
        twin.set_ylabel("loss", color="crimson", fontsize=7)
        twin.tick_params(labelsize=6)
        twin.set_xlim(edges[0], edges[-1])
    return fig


def render_dynamics(
    location: str | os.PathLike[str],
    metric: str,
    *,
    modules: str | Sequence[str] | None = None,
    samples: int | None = None,
    rank: int | None = None,
) -> Figure:
    """:func:`dynamics_view` of a store, or of a directory of TensorBoard event files a callback wrote
    (``attnhooks view RUN dynamics --metric induction``).

    Args:
        location: a store (``.zarr``, ``.h5``) or a directory holding ``events.out.tfevents.*`` files.
        metric: a name of :data:`~attnhooks.analysis.heads.HEAD_METRICS`.
        modules: self-attention modules of a store (names or globs).
        samples: sequences per step read from a store (None: all).
        rank: the rank of a store written under ``torch.distributed``.
    """
    from attnhooks.read.store import open_store

    events = glob.glob(os.path.join(location, "**", "events.out.tfevents.*"), recursive=True)
    if os.path.isdir(location) and events and not os.path.exists(os.path.join(location, "zarr.json")):
        return dynamics_view(dynamics_from_tensorboard(location, metric))
    store = open_store(location)
    if rank is not None:
        store = store.rank(rank)
    return dynamics_view(dynamics_from_store(store, metric, modules=modules, samples=samples))


def _edges(steps: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Cell edges around each step (midpoints; the ends one half-gap out)."""
    s = steps.astype(np.float64)
    if s.shape[0] == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _any(values: npt.NDArray[np.float64]) -> bool:
    return bool(np.isfinite(values).any())


def _check(metric: str) -> None:
    try:
        check_metrics((metric,))
    except AnalysisError as err:
        raise ViewError(f"--metric {metric!r}: use one of {', '.join(HEAD_METRICS)}") from err
