"""Where a capture's records go besides ``Capture.records``: a step sink (a store's writer), handed to
the session by whoever made it (:func:`attnhooks.capture`), so the capture side never imports the
write side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from attnhooks.capturing.distributed import RankInfo
from attnhooks.capturing.record import Record

__all__ = ["StepSink", "StoreOpener"]


class StepSink(Protocol):
    """The steps of one capture as a store receives them (:class:`attnhooks.write.writer.StoreWriter`)."""

    last_step: int | None  # the last step a store being appended to holds
    bytes_written: int

    def holds(self, step: int) -> bool: ...

    def admit(self, nbytes: int) -> bool: ...

    def begin_step(self, step: int) -> None: ...

    def put(self, rec: Record, nbytes: int, ready: Any = None) -> None: ...

    def dropout(self, module: str, call: int, p: float) -> None: ...

    def cut(self, module: str, call: int, rows: int, keys: int) -> None: ...

    def tokens(self, ids: np.ndarray, text: list[list[str]] | None) -> None: ...

    def end_step(self) -> None: ...

    def drop_step(self, count: bool = True) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


StoreOpener = Callable[[dict[str, Any], "RankInfo | None"], StepSink]
"""Opens the sink when the capture starts: ``(metadata of the model and rank, rank) -> sink``."""
