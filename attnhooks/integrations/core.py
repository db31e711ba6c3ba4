"""The part of a training callback that knows no trainer: its options, its two phases' windows, its
sinks and the metrics history. :mod:`~attnhooks.integrations.hf` and
:mod:`~attnhooks.integrations.lightning` only map their trainer's events onto it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.nn as nn

from attnhooks.capturing.select import Modules
from attnhooks.errors import RecordOptionError
from attnhooks.integrations.loggers import AccelerateSink, CallableSink, MetricSink, TensorBoardSink, WandbSink
from attnhooks.integrations.metrics import StepMetrics
from attnhooks.integrations.options import DEFAULT_METRICS, CallbackOptions, callback_options
from attnhooks.integrations.windows import Windows
from attnhooks.write.open import Location

__all__ = ["CallbackCore", "sink_for"]


class CallbackCore:
    """Options, windows, sinks and history of one callback (arguments: see the callbacks).

    Attributes:
        options: the checked :class:`CallbackOptions`.
        train: the training :class:`Windows`; ``eval``: the evaluation ones.
        history: every captured step's :class:`StepMetrics`, in order (training and evaluation).
        sinks: where metrics go; filled by the callback when training begins.
    """

    def __init__(
        self,
        every: int,
        *,
        store: Location | None = None,
        record: Iterable[str] | None = None,
        modules: Modules = None,
        metrics: Iterable[str] | str = DEFAULT_METRICS,
        evaluation: bool = False,
        eval_store: Location | None = None,
        mode: str = "create",
        samples: int | None = None,
        figures: bool | int = 10,
        loggers: str | Sequence[Any] = "auto",
        capture: dict[str, Any] | None = None,
    ) -> None:
        self.options: CallbackOptions = callback_options(
            every=every,
            store=store,
            record=record,
            modules=modules,
            metrics=metrics,
            evaluation=evaluation,
            eval_store=eval_store,
            mode=mode,
            samples=samples,
            figures=figures,
            capture=capture or {},
        )
        if loggers != "auto" and (isinstance(loggers, str) or not isinstance(loggers, Sequence)):
            raise RecordOptionError(f"loggers={loggers!r}: use 'auto' (the trainer's) or a list of loggers")
        self.given: list[MetricSink] | None = None if loggers == "auto" else [sink_for(x) for x in loggers]
        self.train = Windows(self.options, "train", store)
        self.eval = Windows(self.options, "eval", eval_store)
        self.history: list[StepMetrics] = []
        self.sinks: list[MetricSink] = []
        self.log_here = True  # False on the ranks that do not log (all but the main process)
        self._logged: dict[str, int] = {}  # captured steps logged so far, per phase

    def check(self, model: nn.Module) -> None:
        """Refuse before the first step what the model makes wrong (an unknown module name)."""
        self.train.check(model)
        if self.options.evaluation:
            self.eval.check(model)

    def captures(self, step: int) -> bool:
        return step % self.options.every == 0 and self.train.wanted

    def emit(self, metrics: StepMetrics | None) -> None:
        if metrics is None:
            return
        self.history.append(metrics)
        count = self._logged.get(metrics.phase, 0)
        self._logged[metrics.phase] = count + 1
        figure = self.options.figures > 0 and count % self.options.figures == 0
        if self.log_here:
            for sink in self.sinks:
                sink.log(metrics, figure)

    def finish(self, failed: bool = False) -> None:
        """Close what is open (the end of training)."""
        try:
            self.emit(self.train.close(failed))
        finally:
            self.emit(self.eval.close(failed))


def sink_for(logger: Any) -> MetricSink:
    """A sink for what a user passed in ``loggers=``: a ``SummaryWriter``, a W&B run, an accelerate
    ``Accelerator``, a :class:`MetricSink`, or a function taking :class:`StepMetrics`."""
    kind = type(logger).__module__.split(".")[0]
    if hasattr(logger, "add_scalar") and hasattr(logger, "add_figure"):
        return TensorBoardSink(logger)
    if kind == "wandb":
        return WandbSink(logger, None)
    if kind == "accelerate":
        return AccelerateSink(logger)
    if hasattr(logger, "log") and callable(logger.log):
        return logger  # type: ignore[no-any-return]
    if callable(logger):
        function: Callable[[StepMetrics], Any] = logger
        return CallableSink(function)
    raise RecordOptionError(
        f"loggers=[..., {logger!r}, ...]: expected a SummaryWriter, a wandb run, an accelerate Accelerator, an "
        "object with .log(metrics, figures), or a function taking the step's metrics"
    )
