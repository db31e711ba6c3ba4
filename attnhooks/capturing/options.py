"""What a capture keeps and how: one frozen :class:`CaptureOptions`, checked once when the capture is
made (every refused option raises before anything is installed or created)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from attnhooks.capturing.build import RECORDABLE, RecordOptions
from attnhooks.capturing.select import Modules
from attnhooks.errors import RecordOptionError
from attnhooks.reduce.summary import SummaryOptions

__all__ = ["DEFAULT_RECORD", "CaptureOptions", "capture_options", "record_options"]

DEFAULT_RECORD = ("attn", "q", "k")


@dataclass(frozen=True)
class CaptureOptions:
    """The options of one capture (see :func:`attnhooks.capture` for each).

    Attributes:
        modules: the selection, as given.
        record: what each call keeps, checked (:class:`RecordOptions`).
        every: capture one step in ``every``.
        keep: keep the records in ``Capture.records``.
        tokenizer: turns stored token ids into strings.
        progress: show a progress bar.
        distributed: write a rank set under torch.distributed (None: when initialised).
        ranks: the ranks that capture (None: all).
        described: the options as given, for a store's metadata (JSON-able).
    """

    modules: Modules = None
    record: RecordOptions = field(default_factory=lambda: record_options(DEFAULT_RECORD, False, "flag"))
    every: int = 1
    keep: bool = True
    tokenizer: Any = None
    progress: bool = False
    distributed: bool | None = None
    ranks: frozenset[int] | None = None
    described: dict[str, Any] = field(default_factory=dict)


def capture_options(
    *,
    modules: Modules,
    record: Iterable[str],
    every: int,
    verify: bool | int,
    dropout: str,
    keep: bool,
    tokenizer: Any,
    summary: SummaryOptions | dict[str, int] | None,
    progress: bool,
    rows: slice | Iterable[slice] | None,
    distributed: bool | None,
    ranks: Iterable[int] | None,
) -> CaptureOptions:
    """Check every capture option and freeze them (:class:`RecordOptionError` names the fix)."""
    checked = record_options(record, verify, dropout, summary, rows)
    every = _check_every(every)
    described = {
        "record": sorted(checked.record),
        "every": every,
        "verify": checked.verify,
        "dropout": dropout,
        "modules": modules if isinstance(modules, (str, list, tuple, type(None))) else repr(modules),
        "summary": dataclasses.asdict(checked.summary),
    }
    return CaptureOptions(
        modules=modules,
        record=checked,
        every=every,
        keep=keep,
        tokenizer=tokenizer,
        progress=progress,
        distributed=_check_distributed(distributed),
        ranks=_check_ranks(ranks),
        described=described,
    )


def record_options(
    record: Iterable[str],
    verify: bool | int,
    dropout: str,
    summary: SummaryOptions | dict[str, int] | None = None,
    rows: slice | Iterable[slice] | None = None,
) -> RecordOptions:
    if isinstance(record, str):
        record = (record,)
    wanted = tuple(record)
    unknown = [r for r in wanted if r not in RECORDABLE]
    if unknown or not wanted:
        raise RecordOptionError(
            f"record={wanted!r}: each entry must be one of {RECORDABLE}, and at least one is needed; "
            "e.g. record=('q', 'k') for the cheapest exact capture"
        )
    if dropout not in ("flag", "refuse"):
        raise RecordOptionError(f"dropout={dropout!r}: use 'flag' or 'refuse'")
    if isinstance(verify, bool):
        verify_rows = 4 if verify else 0
    elif isinstance(verify, int) and verify >= 0:
        verify_rows = verify
    else:
        raise RecordOptionError(f"verify={verify!r}: use True/False or a number of rows per call")
    try:
        sizes = summary if isinstance(summary, SummaryOptions) else SummaryOptions(**(summary or {}))
    except (TypeError, ValueError) as err:
        raise RecordOptionError(f"summary={summary!r}: {err}; fields: topk, sinks, band, pooled, block") from err
    return RecordOptions(frozenset(wanted), verify_rows, dropout, sizes, _windows(rows, wanted))


def _windows(rows: slice | Iterable[slice] | None, wanted: tuple[str, ...]) -> tuple[slice, ...] | None:
    if rows is None:
        return None
    windows = (rows,) if isinstance(rows, slice) else tuple(rows)
    if "attn" not in wanted:
        raise RecordOptionError(f"rows={rows!r} chooses which rows keep 'attn', but record={wanted!r} has no 'attn'")
    for w in windows:
        if not isinstance(w, slice) or w.step not in (None, 1):
            raise RecordOptionError(f"rows={rows!r}: give slices with step 1, e.g. slice(-512, None)")
    return windows


def _check_distributed(distributed: bool | None) -> bool | None:
    if distributed not in (None, True, False):
        raise RecordOptionError(f"distributed={distributed!r}: use None (auto), True or False")
    return distributed


def _check_ranks(ranks: Iterable[int] | None) -> frozenset[int] | None:
    if ranks is None:
        return None
    chosen = frozenset([ranks] if isinstance(ranks, int) else ranks)
    if not chosen or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in chosen):
        raise RecordOptionError(f"ranks={ranks!r}: use None (every rank) or non-negative ints, e.g. ranks=[0]")
    return chosen


def _check_every(every: int) -> int:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise RecordOptionError(f"every={every!r}: use a positive int (1 captures every step)")
    return every
