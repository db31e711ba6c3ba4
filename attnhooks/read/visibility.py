"""Which keys each stored row of a call may attend: the reader's compact mask rule (numpy).

Row ``i`` of a call's stored rows sees key ``j`` when ``j`` is among the keys the row attended over
(its ``rowkeys``), ``j <= i + diagonal`` for a causal call, ``i + diagonal - j < window`` for a
sliding window, and the key is not padding. A dense additive mask, when the call has one, comes on
top (see :meth:`attnhooks.read.tiles.CallReader.dense`). The capture side applies the same rule in
torch; ``tests/property/test_mask_rule.py`` holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Visibility"]


@dataclass(frozen=True)
class Visibility:
    """The compact mask of one call.

    Attributes:
        causal: whether row ``i`` sees only keys ``j <= i + diagonal``.
        diagonal: where stored row 0 sits among the keys (the call's ``q_offset + mask_offset``).
        window: a sliding window (row ``i`` sees keys with ``i + diagonal - j < window``), or None.

    Example:
        >>> Visibility(causal=True, diagonal=0, window=None).allowed(
        ...     slice(0, 2), slice(0, 3), rowkeys=np.array([3, 3]), key_valid=None
        ... )
        array([[ True, False, False],
               [ True,  True, False]])
    """

    causal: bool
    diagonal: int
    window: int | None

    def allowed(self, rows: slice, cols: slice, rowkeys: np.ndarray, key_valid: np.ndarray | None) -> np.ndarray:
        """``[r, c]`` bool: which keys of ``cols`` each row of ``rows`` may attend.

        Args:
            rows, cols: contiguous ranges of stored rows and of key positions.
            rowkeys: ``[r]`` how many leading keys each row of ``rows`` attended over.
            key_valid: ``[k_len]`` bool, False for padded keys; None when no key is padded.
        """
        i = np.arange(rows.start, rows.stop)[:, None]
        j = np.arange(cols.start, cols.stop)[None, :]
        ok = j < rowkeys[:, None]
        if self.causal:
            ok &= j <= i + self.diagonal
        if self.window is not None:
            ok &= i + self.diagonal - j < self.window
        if key_valid is not None:
            ok &= key_valid[cols][None, :]
        return ok

    def live_cols(self, rows: slice, cols: slice, rowkeys: np.ndarray) -> slice:
        """The part of ``cols`` that some row of ``rows`` may attend (causal / window / ``rowkeys``,
        ``[r]`` as for :meth:`allowed`); an empty slice for no rows."""
        if rows.stop <= rows.start:
            return slice(cols.start, cols.start)
        stop = min(cols.stop, int(rowkeys.max()))
        if self.causal:
            stop = min(stop, rows.stop - 1 + self.diagonal + 1)
        start = cols.start
        if self.window is not None:
            start = max(start, rows.start + self.diagonal - self.window + 1)
        start = max(start, 0)
        return slice(start, max(start, stop))
