"""Token ids (and strings) of a step, for the store: taken from ``input_ids`` and ``generate``'s
sequences, or given with ``Capture.set_tokens``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnhooks.capturing.sink import StepSink

__all__ = ["as_ids", "stored_ids"]


def stored_ids(sink: StepSink, tokenizer: Any, value: Any, text: list[list[str]] | None = None) -> bool:
    """Hand ``value``'s ids to ``sink`` with their strings (``text``, or the tokenizer's); False when
    ``value`` is not token ids."""
    ids = as_ids(value)
    if ids is None:
        return False
    sink.tokens(ids, text if text is not None else _token_text(tokenizer, ids))
    return True


def as_ids(value: Any) -> np.ndarray | None:
    """Integer token ids as int64 ``[batch, len]``, or None when ``value`` is not ids."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        if value.dim() not in (1, 2):
            return None
        value = value.detach().cpu().numpy()
    elif isinstance(value, list) and value:
        rows = value if isinstance(value[0], list) else [value]
        ints = all(isinstance(r, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in r) for r in rows)
        if not ints or len({len(r) for r in rows}) != 1:
            return None
        value = np.asarray(rows, dtype=np.int64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim not in (1, 2):
        return None
    return value.reshape(-1, value.shape[-1]).astype(np.int64)


def _token_text(tokenizer: Any, ids: np.ndarray) -> list[list[str]] | None:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return None
    return [[str(t) for t in convert([int(i) for i in row])] for row in ids]
