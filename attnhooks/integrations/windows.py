"""What both training callbacks share: the captured steps of one phase (training or evaluation).

A *window* is one captured step: the forwards (and backwards) between its opening and its closing,
gradient-accumulation micro-batches included, are calls of that one step, numbered by the trainer's
global step. Each window is its own :func:`attnhooks.capture`: its hooks exist only while the window
is open, so the steps in between run the model exactly as without attnhooks (nothing installed,
nothing intercepted). The first window opens the store with the callback's ``mode``; later ones
append to it.

Compiled models (``torch.compile``): inside a window the compiler's stance is ``"force_eager"``, so
the captured step runs the original Python modules eagerly (the capture sees every attention call,
exactly as the eager model computes it) and the compiled graphs are kept, unchanged, for the steps
in between; no hook is ever traced into a graph. A captured step of a compiled model therefore
costs an eager step, and its float results are those of the eager model.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from attnhooks.api import capture
from attnhooks.capturing.select import unwrap
from attnhooks.capturing.session import Capture
from attnhooks.integrations.metrics import Forward, StepMetrics, step_metrics
from attnhooks.integrations.options import CallbackOptions
from attnhooks.write.open import Location

__all__ = ["Windows"]


class Windows:
    """The captured steps of one phase of a run.

    Args:
        options: the callback's options.
        phase: ``"train"`` or ``"eval"``.
        store: where this phase's steps go (None: metrics only).
    """

    def __init__(self, options: CallbackOptions, phase: str, store: Location | None) -> None:
        self.options = options
        self.phase = phase
        self.store = store
        self.step: int | None = None  # the step of the open window
        self._cap: Capture | None = None
        self._forwards: list[Forward] = []
        self._hook: Any = None
        self._stance: contextlib.AbstractContextManager[Any] | None = None
        self._created = False

    @property
    def wanted(self) -> bool:
        """False when this phase has nothing to do (no store and no metrics)."""
        return self.store is not None or bool(self.options.metrics)

    def check(self, model: nn.Module) -> None:
        """Refuse before training what would fail at the first captured step (modules, record, store
        options): builds the capture without entering it (nothing is installed or created)."""
        if self.wanted:
            capture(model, **self._arguments(mode=self.options.mode))

    def open(self, model: nn.Module, step: int) -> None:
        """Open the window of ``step``. A window left open (the training raised in its step and is run
        again) is closed first as failed: its step is not committed."""
        if self._cap is not None:
            self.close(failed=True)
        if not self.wanted:
            return
        cap = capture(model, **self._arguments(mode="append" if self._created else self.options.mode))
        # nothing can be compiled before torch._dynamo is imported: then there is no stance to set
        stance = torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else None
        try:
            cap.__enter__()
        except BaseException:
            if stance is not None:
                stance.__exit__(None, None, None)
            raise
        self._created = self._created or self.store is not None
        self._cap, self._stance, self.step = cap, stance, step
        self._forwards = []
        try:
            cap.step = step
            self._hook = unwrap(model)[-1].register_forward_pre_hook(self._forward, with_kwargs=True)
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, failed: bool = False) -> StepMetrics | None:
        """Close the open window: every hook removed, the step committed to the store (dropped when
        ``failed``); returns the step's metrics (None without metrics or without an open window)."""
        cap, self._cap = self._cap, None
        if cap is None:
            return None
        step, self.step = self.step, None
        hook, self._hook = self._hook, None
        stance, self._stance = self._stance, None
        try:
            if hook is not None:
                hook.remove()
            cap.__exit__(*((RuntimeError, RuntimeError("training failed"), None) if failed else (None, None, None)))
        finally:
            if stance is not None:
                stance.__exit__(None, None, None)
        if failed or not self.options.metrics or step is None:
            return None
        forwards, self._forwards = self._forwards, []
        result = step_metrics(cap.records, forwards, self.options.metrics, step, self.phase, self.options.samples)
        cap.clear()
        return result

    def _arguments(self, mode: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {**self.options.capture, "modules": self.options.modules}
        if self.store is None:
            kwargs["record"] = ("attn",)
        else:
            kwargs.update(record=self.options.record, store=self.store, mode=mode, keep=bool(self.options.metrics))
        return kwargs

    def _forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        cap = self._cap
        if cap is None:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        mask = kwargs.get("attention_mask")
        self._forwards.append(Forward(len(cap.records), _host(ids), _host(mask)))


def _host(value: Any) -> np.ndarray | None:
    """A 2-D integer tensor (ids or a mask) copied to the CPU as int64 numpy, else None."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.is_floating_point():
        return None
    return value.detach().to("cpu", torch.int64).numpy()
