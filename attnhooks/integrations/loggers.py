"""Where a captured step's metrics go: TensorBoard, Weights & Biases, accelerate's trackers.

Every sink logs the per-head scalars (``attnhooks/<metric>/L<layer>H<head>``, ``attnhooks_eval/...``
for evaluation steps) at the trainer's global step and, unless disabled, one figure per step
(``attnhooks/grid``): a layer x head panel per metric (:func:`grid_figure`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from attnhooks.integrations.metrics import StepMetrics

__all__ = [
    "AccelerateSink",
    "CallableSink",
    "MetricSink",
    "TensorBoardSink",
    "WandbSink",
    "grid_figure",
    "grid_image",
    "prefix",
]


class MetricSink(Protocol):
    """Takes the metrics of a captured step."""

    def log(self, metrics: StepMetrics, figures: bool) -> None: ...


def prefix(metrics: StepMetrics) -> str:
    """The tag prefix of a step's phase: ``attnhooks`` (training) or ``attnhooks_eval``."""
    return "attnhooks" if metrics.phase == "train" else f"attnhooks_{metrics.phase}"


def grid_figure(metrics: StepMetrics) -> Any:
    """One matplotlib figure of a step: a ``[layers, heads]`` panel per metric, each cell annotated.

    Returns:
        A ``matplotlib.figure.Figure`` (not attached to pyplot).
    """
    from matplotlib.figure import Figure

    names = list(metrics.values)
    layers, heads = next(iter(metrics.values.values())).shape if names else (0, 0)
    width, height = 0.6 + 0.4 * max(heads, 1), 0.9 + 0.3 * max(layers, 1)
    fig = Figure(figsize=(width * max(len(names), 1), height), dpi=72)
    fig.subplots_adjust(left=0.5 / fig.get_figwidth() + 0.02, right=0.99, bottom=0.45 / height, top=1 - 0.35 / height)
    for i, name in enumerate(names):
        grid = metrics.values[name]
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.imshow(grid, cmap="viridis", aspect="auto")
        if layers * heads <= 64:
            for (row, col), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers) if i == 0 else [])
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{metrics.phase} step {metrics.step}  (rows: layers, columns: heads)", fontsize=8)
    return fig


def grid_image(metrics: StepMetrics) -> np.ndarray:
    """:func:`grid_figure` rendered (Agg, no pyplot): uint8 ``[height, width, 3]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(grid_figure(metrics))
    canvas.draw()  # type: ignore[no-untyped-call]
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[no-untyped-call]


class TensorBoardSink:
    """``add_scalar`` per head and ``add_image`` of the step's grid figure on a ``SummaryWriter``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        tag = prefix(metrics)
        for key, value in metrics.scalars(tag).items():
            self.writer.add_scalar(key, value, metrics.step)
        if figures and metrics.values:
            self.writer.add_image(f"{tag}/grid", grid_image(metrics), metrics.step, dataformats="HWC")


class WandbSink:
    """One ``run.log`` per captured step: the scalars, the grid figure as a ``wandb.Image`` and the step
    under ``step_key`` (the trainer's step metric: ``train/global_step`` for Hugging Face,
    ``trainer/global_step`` for Lightning), or as W&B's own ``step=`` when ``step_key`` is None."""

    def __init__(self, run: Any, step_key: str | None) -> None:
        self.run = run
        self.step_key = step_key

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        import wandb

        tag = prefix(metrics)
        payload: dict[str, Any] = metrics.scalars(tag)
        if figures and metrics.values:
            payload[f"{tag}/grid"] = wandb.Image(grid_image(metrics))
        if self.step_key is None:
            self.run.log(payload, step=metrics.step)
        else:
            self.run.log({**payload, self.step_key: metrics.step})


class AccelerateSink:
    """``accelerator.log`` of the scalars (every tracker accelerate holds), and the figures through
    the TensorBoard and W&B trackers when it holds them."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        self.accelerator.log(metrics.scalars(prefix(metrics)), step=metrics.step)
        if not figures:
            return
        for tracker in getattr(self.accelerator, "trackers", []):
            name = getattr(tracker, "name", "")
            if name == "tensorboard":
                TensorBoardSink(tracker.writer).log(_figures_only(metrics), True)
            elif name == "wandb":
                WandbSink(tracker.run, None).log(_figures_only(metrics), True)


class CallableSink:
    """Hands each step's :class:`StepMetrics` to a function (e.g. a list's ``append``)."""

    def __init__(self, function: Callable[[StepMetrics], Any]) -> None:
        self.function = function

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        self.function(metrics)


def _figures_only(metrics: StepMetrics) -> StepMetrics:
    """The figures of ``metrics`` with no scalars (accelerate logged those already)."""

    class Figures(StepMetrics):
        def scalars(self, prefix: str) -> dict[str, float]:
            return {}

    return Figures(metrics.step, metrics.phase, metrics.modules, metrics.values)
