"""The options of a training callback, checked when the callback is made (before training starts)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from attnhooks.analysis.heads import check_metrics
from attnhooks.capturing.select import Modules
from attnhooks.errors import AnalysisError, RecordOptionError, StoreExistsError
from attnhooks.write.open import Location

__all__ = ["DEFAULT_METRICS", "CallbackOptions", "callback_options"]

DEFAULT_METRICS = ("entropy", "sink", "previous", "induction", "distance")
_RECORDABLE = ("attn", "q", "k", "lse", "summary")


@dataclass(frozen=True)
class CallbackOptions:
    """What a training callback captures and logs (see the callbacks' docstrings for each field).

    Attributes:
        every: capture optimizer steps ``0, every, 2*every, ...`` (the trainer's global steps).
        store: stream the captured training steps there (None: keep nothing but the metrics).
        record: what each call keeps (as :func:`attnhooks.capture`); ``"attn"`` when metrics are asked
            for without a store.
        modules: which modules' attention calls (as :func:`attnhooks.capture`).
        metrics: per-head metrics to log (:data:`attnhooks.analysis.heads.HEAD_METRICS`).
        evaluation: also capture the evaluation passes run during training.
        eval_store: where evaluation steps go (None: metrics only).
        mode: the store's mode at the first captured step (later ones append).
        samples: sequences per forward used for the metrics (None: all).
        figures: log the grid figure every ``figures`` captured steps of a phase (the first one
            included; 0: never).
        capture: further keywords of :func:`attnhooks.capture` (``buffer``, ``dtype``, ``ranks``...).
    """

    every: int
    store: Location | None = None
    record: tuple[str, ...] = ("attn",)
    modules: Modules = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    evaluation: bool = False
    eval_store: Location | None = None
    mode: str = "create"
    samples: int | None = None
    figures: int = 10
    capture: dict[str, Any] = field(default_factory=dict)


def callback_options(
    *,
    every: int,
    store: Location | None,
    record: Iterable[str] | None,
    modules: Modules,
    metrics: Iterable[str] | str,
    evaluation: bool,
    eval_store: Location | None,
    mode: str,
    samples: int | None,
    figures: bool | int,
    capture: dict[str, Any],
) -> CallbackOptions:
    """Check what needs no model (``every``, ``metrics``, ``record``, the stores); the module selection
    is checked against the model when training begins, before its first step."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise RecordOptionError(f"every={every!r}: use a positive int (capture optimizer steps 0, N, 2N, ...)")
    try:
        names = check_metrics(metrics)
    except AnalysisError as err:
        raise RecordOptionError(str(err)) from err
    wanted = _record(record, store, names)
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise RecordOptionError(f"samples={samples!r}: use None (every sequence) or a positive int")
    if not isinstance(figures, int) or figures < 0:
        raise RecordOptionError(f"figures={figures!r}: use True (every captured step), False, or every how many")
    if eval_store is not None and not evaluation:
        raise RecordOptionError("eval_store= is given but evaluation=False: pass evaluation=True to capture them")
    for location, name in ((store, "store"), (eval_store, "eval_store")):
        if mode == "create" and isinstance(location, (str, os.PathLike)) and os.path.exists(location):
            raise StoreExistsError(
                f"{name}={os.fspath(location)!r} exists already; give a new path, or mode='overwrite' to replace "
                "it, or mode='append' to add steps to it"
            )
    if store is not None and eval_store is not None and _same(store, eval_store):
        raise RecordOptionError(f"store and eval_store are the same ({store!r}): evaluation steps are kept apart")
    reserved = {"store", "record", "modules", "every", "mode", "keep"} & set(capture)
    if reserved:
        raise RecordOptionError(f"{sorted(reserved)} are the callback's own arguments, not capture= keywords")
    return CallbackOptions(
        every=every,
        store=store,
        record=wanted,
        modules=modules,
        metrics=names,
        evaluation=bool(evaluation),
        eval_store=eval_store,
        mode=mode,
        samples=samples,
        figures=int(figures),
        capture=dict(capture),
    )


def _record(record: Iterable[str] | None, store: Location | None, metrics: tuple[str, ...]) -> tuple[str, ...]:
    if record is None:
        return ("attn", "q", "k") if store is not None else ("attn",)
    wanted = (record,) if isinstance(record, str) else tuple(record)
    unknown = [r for r in wanted if r not in _RECORDABLE]
    if unknown or not wanted:
        raise RecordOptionError(f"record={wanted!r}: each entry must be one of {_RECORDABLE}, and at least one")
    if metrics and "attn" not in wanted:
        raise RecordOptionError(
            f"record={wanted!r} has no 'attn', but metrics={metrics!r} are computed from the attention "
            "probabilities: add 'attn' to record, or pass metrics=() to log none"
        )
    return wanted


def _same(a: Location, b: Location) -> bool:
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))
    return a is b
