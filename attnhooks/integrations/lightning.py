"""``AttnHooksCallback`` for PyTorch Lightning 2.x.

Example:
    >>> from attnhooks.integrations.lightning import AttnHooksCallback      # doctest: +SKIP
    >>> trainer = pl.Trainer(max_steps=100, callbacks=[AttnHooksCallback(every=10, store="run.zarr")])
    >>> trainer.fit(module, data)   # steps 0, 10, 20, ... in run.zarr; metrics to the trainer's loggers
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

try:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
except ImportError as err:  # pragma: no cover - the extra is installed in CI
    raise ImportError(
        f"attnhooks.integrations.lightning needs pytorch-lightning 2.x ({err}): pip install 'attnhooks[lightning]'"
    ) from err

from attnhooks.capturing.select import Modules
from attnhooks.errors import ModuleSelectionError
from attnhooks.integrations.core import CallbackCore
from attnhooks.integrations.loggers import MetricSink, TensorBoardSink, WandbSink, prefix
from attnhooks.integrations.metrics import StepMetrics
from attnhooks.integrations.options import DEFAULT_METRICS
from attnhooks.write.open import Location

__all__ = ["AttnHooksCallback"]


class AttnHooksCallback(pl.Callback):
    """Capture attention every ``every`` optimizer steps of a Lightning run; log per-head metrics.

    Steps are ``trainer.global_step`` (optimizer steps: 0, N, 2N, ...); with
    ``accumulate_grad_batches`` every micro-batch of a captured step is a call of that step. A
    captured step opens at its first batch and closes once the optimizer has stepped. Validation
    runs (not the sanity check) are captured with ``evaluation=True``, as their own steps in
    ``eval_store`` and under ``attnhooks_eval/...`` names. Capturing changes no loss, gradient or
    optimizer state.

    The capture watches the module that ``training_step`` calls: the ``LightningModule`` itself
    (``self(batch)``), or its submodule named by ``attribute`` (``training_step`` calling
    ``self.model(...)``: ``attribute="model"``).

    Args:
        every, store, record, modules, metrics, evaluation, eval_store, mode, samples, figures,
        **capture: as :class:`attnhooks.integrations.hf.AttnHooksCallback`.
        attribute: the submodule of the ``LightningModule`` to capture (None: the module itself).
        loggers: ``"auto"``: the trainer's loggers (``TensorBoardLogger``: scalars and figures on its
            ``SummaryWriter``; ``WandbLogger``: one ``log`` with ``wandb.Image`` figures at
            ``trainer/global_step``; any other: its ``log_metrics``); or a list as in the HF callback.

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
        attribute: str | None = None,
        **capture: Any,
    ) -> None:
        super().__init__()
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
        self.attribute = attribute

    @property
    def history(self) -> list[StepMetrics]:
        return self.core.history

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.attribute is None:
            return pl_module
        target = getattr(pl_module, self.attribute, None)
        if not isinstance(target, nn.Module):
            children = [name for name, _ in pl_module.named_children()]
            raise ModuleSelectionError(
                f"attribute={self.attribute!r}: the LightningModule has no submodule of that name; "
                f"its children are {children}"
            )
        return target

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.check(self._target(pl_module))
        self.core.log_here = bool(trainer.is_global_zero)
        self.core.sinks = self.core.given if self.core.given is not None else _auto_sinks(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.core.train.step is None and self.core.captures(step):
            self.core.train.open(self._target(pl_module), step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.core.train.step is not None and trainer.global_step != self.core.train.step:
            self.core.emit(self.core.train.close())  # the optimizer stepped: the captured step is whole

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core.options.evaluation and not trainer.sanity_checking:
            self.core.eval.open(self._target(pl_module), trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.emit(self.core.eval.close())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.core.finish(failed=True)


class _LoggerSink:
    """Any other Lightning logger: the scalars through its ``log_metrics``."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log(self, metrics: StepMetrics, figures: bool) -> None:
        self.logger.log_metrics(metrics.scalars(prefix(metrics)), step=metrics.step)


def _auto_sinks(trainer: pl.Trainer) -> list[MetricSink]:
    sinks: list[MetricSink] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger.experiment))
        elif isinstance(logger, WandbLogger):
            sinks.append(WandbSink(logger.experiment, "trainer/global_step"))
        else:
            sinks.append(_LoggerSink(logger))
    return sinks
