"""``AttnHooksCallback`` for the Hugging Face ``Trainer``.

Example:
    >>> from attnhooks.integrations.hf import AttnHooksCallback           # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=data,
    ...                   callbacks=[AttnHooksCallback(every=10, store="run.zarr")])
    >>> trainer.train()          # steps 0, 10, 20, ... in run.zarr; metrics in TensorBoard / W&B
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:  # pragma: no cover - the extra is installed in CI
    raise ImportError(f"attnhooks.integrations.hf needs transformers ({err}): pip install 'attnhooks[hf]'") from err

from attnhooks.capturing.select import Modules
from attnhooks.errors import CaptureStateError, RecordOptionError
from attnhooks.integrations.core import CallbackCore
from attnhooks.integrations.loggers import MetricSink, TensorBoardSink, WandbSink
from attnhooks.integrations.metrics import StepMetrics
from attnhooks.integrations.options import DEFAULT_METRICS
from attnhooks.write.open import Location

__all__ = ["AttnHooksCallback"]


class AttnHooksCallback(TrainerCallback):
    """Capture attention every ``every`` optimizer steps of a ``Trainer`` run; log per-head metrics.

    The steps are the trainer's global steps (``state.global_step`` when the step begins: 0, N, 2N,
    ...). Under gradient accumulation every micro-batch of a captured step is a call of that step
    (call 0, 1, ... of each module). Capturing changes no loss, gradient or optimizer state: the
    capture only reads. Evaluation passes run during training are captured when
    ``evaluation=True``, as their own steps (the global step at which they run) in ``eval_store`` and
    under ``attnhooks_eval/...`` metric names, never mixed with the training steps (a
    ``trainer.evaluate()`` called outside ``train()`` is not captured: the Trainer announces no
    evaluation before it runs, only after).

    Args:
        every: capture one optimizer step in ``every`` (a positive int).
        store: stream the captured training steps to this store (``.zarr`` / ``.h5`` / a backend);
            None keeps only the metrics. Under DDP / FSDP every rank writes its group of a rank set,
            as :func:`attnhooks.capture` does (``capture={"ranks": [0]}`` to capture on rank 0 only).
        record: what each call keeps in the store (default ``("attn", "q", "k")``); must hold
            ``"attn"`` when ``metrics`` are asked for.
        modules: which modules' attention (as :func:`attnhooks.capture`); checked against the
            model when training begins.
        metrics: per-head metrics (names of :data:`attnhooks.analysis.heads.HEAD_METRICS`), or ()
            for none. They are computed from the captured step's records in memory (no store needed).
        evaluation: also capture the evaluations the trainer runs during training.
        eval_store: the store of the evaluation steps (None: metrics only).
        mode: the store's mode at the first captured step: ``"create"`` (refused at once when the
            path exists), ``"overwrite"`` or ``"append"``; later steps append.
        samples: sequences of each forward used for the metrics (None: all).
        figures: also log the grid figure (``attnhooks/grid``: a layer x head panel per metric) every
            ``figures`` captured steps, the first included (``True``: every one; ``False``: never). A
            figure costs ~0.1 s to draw, more than the rest of a captured step on a small model.
        loggers: ``"auto"`` (the trainer's ``report_to``: TensorBoard in ``$TENSORBOARD_LOGGING_DIR``
            or ``<output_dir>/runs``, under ``attnhooks/``; the active W&B run), or a list of
            ``SummaryWriter`` / wandb run / ``Accelerator`` / functions taking the step's metrics.
        **capture: further keywords of :func:`attnhooks.capture` (``buffer``, ``dtype``,
            ``compression``, ``ranks``, ``distributed``, ``summary``...).

    Raises:
        RecordOptionError: ``every`` < 1, an unknown metric, ``record`` without ``"attn"`` for
            metrics, or a keyword :func:`attnhooks.capture` refuses.
        StoreExistsError: ``store`` exists and ``mode="create"``.
        ModuleSelectionError: (when training begins) ``modules`` matches no module.

    Attributes:
        history: every captured step's :class:`~attnhooks.integrations.metrics.StepMetrics`.
    """

    def __init__(
        self,
        every: int = 10,
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
        **capture: Any,
    ) -> None:
        self.core = CallbackCore(
            every,
            store=store,
            record=record,
            modules=modules,
            metrics=metrics,
            evaluation=evaluation,
            eval_store=eval_store,
            mode=mode,
            samples=samples,
            figures=figures,
            loggers=loggers,
            capture=capture,
        )
        self._writer: Any = None  # the SummaryWriter made here, closed at the end

    @property
    def history(self) -> list[StepMetrics]:
        return self.core.history

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            raise CaptureStateError("AttnHooksCallback.on_train_begin got no model from the Trainer")
        self.core.check(model)
        self.core.log_here = bool(state.is_world_process_zero)
        self.core.sinks = self.core.given if self.core.given is not None else self._auto_sinks(args)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.core.captures(state.global_step):
            self.core.train.open(kwargs["model"], state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.core.emit(self.core.train.close())
        if self.core.options.evaluation and control.should_evaluate:
            self.core.eval.open(kwargs["model"], state.global_step)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.core.emit(self.core.eval.close())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self.core.finish()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        """Remove what an open captured step installed, without committing it: for a training that raised
        (the ``Trainer`` calls no callback then; ``on_train_end`` does this after a normal run)."""
        try:
            self.core.finish(failed=True)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _auto_sinks(self, args: TrainingArguments) -> list[MetricSink]:
        report = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if "all" in report:
            report = ["tensorboard", "wandb"]
        if not self.core.options.metrics:
            return []
        sinks: list[MetricSink] = []
        if "tensorboard" in report:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RecordOptionError(
                    "report_to has 'tensorboard' but tensorboard is not installed: pip install 'attnhooks[tensorboard]'"
                ) from err
            root = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir or ".", "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(root, "attnhooks"))
            sinks.append(TensorBoardSink(self._writer))
        if "wandb" in report:
            import wandb

            if wandb.run is None:
                raise CaptureStateError("report_to has 'wandb' but no W&B run is active at on_train_begin")
            sinks.append(WandbSink(wandb.run, "train/global_step"))
        return sinks
