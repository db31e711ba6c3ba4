"""Where a captured step's metrics go: TensorBoard, Weights & Biases, accelerate's trackers.

Every sink logs the per-head scalars (``attnhooks/<metric>/L<layer>H<head>``, ``attnhooks_eval/...``
for evaluation steps) at the trainer's global step and, unless disabled, one figure per metric: the
layer x head grid (:func:`grid_figure`).
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


def grid_figure(metrics: StepMetrics, name: str) -> Any:
    """A matplotlib figure of one metric's ``[layers, heads]`` grid, each cell annotated.

    Returns:
        A ``matplotlib.figure.Figure`` (not attached to pyplot: close nothing, let it be collected).
    """
    from matplotlib.figure import Figure

    grid = metrics.values[name]
    layers, heads = grid.shape
    fig = Figure(figsize=(1.0 + 0.55 * max(heads, 1), 0.8 + 0.45 * max(layers, 1)), dpi=80)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    if layers * heads <= 256:
        for (row, col), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(layers))
    ax.set_title(f"{name}, {metrics.phase} step {metrics.step}", fontsize=9)
    fig.tight_layout()
    return fig


def grid_image(metrics: StepMetrics, name: str) -> np.ndarray:
    """:func:`grid_figure` rendered (Agg, no pyplot): uint8 ``[height, width, 3]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(grid_figure(metrics, name))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class TensorBoardSink:
    """``add_scalar`` per head and ``add_image`` (the rendered grid figure) per metric on a ``SummaryWriter``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        tag = prefix(metrics)
        for key, value in metrics.scalars(tag).items():
            self.writer.add_scalar(key, value, metrics.step)
        if figures:
            for name in metrics.values:
                image = grid_image(metrics, name)
                self.writer.add_image(f"{tag}/{name}/grid", image, metrics.step, dataformats="HWC")
        self.writer.flush()


class WandbSink:
    """One ``run.log`` per captured step: the scalars, a ``wandb.Image`` per metric and the step
    under ``step_key`` (the trainer's step metric: ``train/global_step`` for Hugging Face,
    ``trainer/global_step`` for Lightning), or as W&B's own ``step=`` when ``step_key`` is None."""

    def __init__(self, run: Any, step_key: str | None) -> None:
        self.run = run
        self.step_key = step_key

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        import wandb

        tag = prefix(metrics)
        payload: dict[str, Any] = metrics.scalars(tag)
        if figures:
            for name in metrics.values:
                payload[f"{tag}/{name}/grid"] = wandb.Image(grid_image(metrics, name))
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
