"""Rule-based head classes after Kovaleva et al. (2019), "Revealing the Dark Secrets of BERT".

Kovaleva et al. sorted BERT's self-attention maps into five patterns by eye (and a small CNN
trained on those labels): vertical (attention to ``[CLS]``/``[SEP]``), diagonal (previous/next
token), vertical+diagonal, block (within the sentence) and heterogeneous. Here three shares of
the head's attention decide, so that every class comes with the numbers behind it:

* ``vertical``: share of the mass on the *vertical columns*: the special-token keys given in
  ``special`` plus the ``columns`` keys that receive the most attention (default 2) among the
  others. Catches ``[CLS]``/``[SEP]``/BOS sinks and any other column that most rows attend.
* ``diagonal``: share of the mass within ``|i - j| <= band`` (default 1: the token itself and
  its neighbours).
* ``block``: share of the mass on keys in the query's own segment (``segments``, e.g. BERT's
  ``token_type_ids``). NaN without segments, or when the keys hold fewer than two segments
  (every head would score 1).

Shares are ``sum over rows of the mass on X / sum over rows of all mass``, so all-zero (padded)
query rows are ignored. The decision, first match wins:

1. ``"vertical"`` if ``vertical >= thresholds.vertical`` and ``vertical >= diagonal``;
2. ``"diagonal"`` if ``diagonal >= thresholds.diagonal``;
3. ``"block"`` if ``block >= thresholds.block``;
4. ``"heterogeneous"`` otherwise.

Kovaleva's "vertical + diagonal" class is folded into whichever of the two shares is larger; the
scores show when both are high. The default thresholds (0.5, 0.5, 0.8) need a few dozen keys to
be meaningful: with ``k`` keys, uniform attention already puts ``(2 + n_special) / k`` on the
vertical columns and about ``3 / k`` on the band.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, check_attn, check_int
from attnhooks.analysis.mass import offset_mass

__all__ = ["HEAD_CLASSES", "HeadThresholds", "classify_head", "classify_heads", "head_pattern_scores"]

HEAD_CLASSES = ("vertical", "diagonal", "block", "heterogeneous")


@dataclass(frozen=True)
class HeadThresholds:
    """The rules' numbers (see :mod:`attnhooks.analysis.classify`).

    Attributes:
        vertical: minimum share of mass on the vertical columns for ``"vertical"``.
        diagonal: minimum share of mass within the band for ``"diagonal"``.
        block: minimum share of mass inside the query's own segment for ``"block"``.
        columns: how many most-attended keys (besides ``special``) count as vertical columns.
        band: keys with ``|i - j| <= band`` count as diagonal.
    """

    vertical: float = 0.5
    diagonal: float = 0.5
    block: float = 0.8
    columns: int = 2
    band: int = 1


def head_pattern_scores(
    attn: Array,
    *,
    segments: npt.ArrayLike | None = None,
    special: npt.ArrayLike | None = None,
    thresholds: HeadThresholds | None = None,
    q_start: int = 0,
) -> dict[str, npt.NDArray[np.float64]]:
    """The shares of attention that decide a head's class: vertical, diagonal and block.

    Args:
        attn: ``[..., heads, q, k]`` (or one head ``[q, k]``) attention (numpy or dask; the
            per-head sums are computed, then everything is numpy).
        segments: int ``[k]`` segment id per key position (query row ``r`` is in segment
            ``segments[q_start + r]``), or None.
        special: bool ``[k]`` keys that always count as vertical columns (e.g.
            :func:`~attnhooks.analysis.special_tokens`), or None.
        thresholds: ``columns`` and ``band`` are read from here (default :class:`HeadThresholds`).
        q_start: position of row 0 among the keys.

    Returns:
        dict ``"vertical"``, ``"diagonal"``, ``"block"`` → float64 ``[..., heads]`` (0-d for one
        head: ``float(scores["vertical"])``).

    Example:
        >>> import numpy as np
        >>> attn = np.zeros((8, 8)); attn[:, 0] = 1.0  # every row attends the first token
        >>> {name: float(value) for name, value in head_pattern_scores(attn).items()}
        {'vertical': 1.0, 'diagonal': 0.25, 'block': nan}
    """
    check_attn(attn)
    rules = thresholds or HeadThresholds()
    k = attn.shape[-1]
    q_start = check_int(q_start, "q_start")
    received = np.asarray(attn.sum(axis=-2, dtype=np.float64))  # [..., k]
    total = received.sum(axis=-1)
    total = np.where(total > 0, total, np.nan)
    marked = np.zeros(k, dtype=bool) if special is None else _key_flags(special, k, "special")
    others = np.sort(np.where(marked, 0.0, received), axis=-1)
    columns = check_int(rules.columns, "thresholds.columns", minimum=0)
    vertical = (received * marked).sum(axis=-1) + others[..., k - min(columns, k) :].sum(axis=-1)
    band = check_int(rules.band, "thresholds.band", minimum=0)
    near = sum(offset_mass(attn, offset, q_start=q_start).sum(axis=-1) for offset in range(-band, band + 1))
    scores = {"vertical": vertical / total, "diagonal": np.asarray(near) / total}
    scores["block"] = _block_share(attn, segments, q_start) / total
    return scores


def classify_heads(
    attn: Array,
    *,
    segments: npt.ArrayLike | None = None,
    special: npt.ArrayLike | None = None,
    thresholds: HeadThresholds | None = None,
    q_start: int = 0,
) -> npt.NDArray[np.str_]:
    """Class of every head (``"vertical"``, ``"diagonal"``, ``"block"``, ``"heterogeneous"``).

    Arguments as in :func:`head_pattern_scores`; the rules are in the module notes.

    Returns:
        str ``[..., heads]``.

    Example:
        >>> import numpy as np
        >>> heads = np.stack([np.eye(8), np.full((8, 8), 1 / 8)])  # [heads=2, q=8, k=8]
        >>> classify_heads(heads)
        array(['diagonal', 'heterogeneous'], dtype='<U13')
    """
    rules = thresholds or HeadThresholds()
    scores = head_pattern_scores(attn, segments=segments, special=special, thresholds=rules, q_start=q_start)
    vertical, diagonal, block = scores["vertical"], scores["diagonal"], scores["block"]
    with np.errstate(invalid="ignore"):
        conditions = [
            (vertical >= rules.vertical) & (vertical >= diagonal),
            diagonal >= rules.diagonal,
            block >= rules.block,
        ]
    return np.select(conditions, list(HEAD_CLASSES[:3]), default=HEAD_CLASSES[3]).astype("<U13")


def classify_head(
    attn: Array,
    *,
    segments: npt.ArrayLike | None = None,
    special: npt.ArrayLike | None = None,
    thresholds: HeadThresholds | None = None,
    q_start: int = 0,
) -> str:
    """Class of one head's ``[q, k]`` attention; see :func:`classify_heads` and the module notes.

    Example:
        >>> import numpy as np
        >>> previous = np.eye(8, k=-1); previous[0, 0] = 1.0
        >>> classify_head(previous)
        'diagonal'
    """
    check_attn(attn, ndim=-2, layout="[q, k] (one head; use classify_heads for more)")
    return str(classify_heads(attn, segments=segments, special=special, thresholds=thresholds, q_start=q_start))


def _block_share(attn: Array, segments: npt.ArrayLike | None, q_start: int) -> npt.NDArray[np.float64]:
    """Mass inside the query's own segment, summed over rows: ``[..., heads]`` (NaN when undefined)."""
    q, k = attn.shape[-2:]
    if segments is None:
        return np.full(attn.shape[:-2], np.nan)
    ids = np.asarray(segments)
    if ids.shape != (k,) or not np.issubdtype(ids.dtype, np.integer):
        raise AnalysisError(
            f"segments must be ints [k] with k={k} (one id per key); got {ids.dtype} shaped {ids.shape}."
        )
    if len(np.unique(ids)) < 2:
        return np.full(attn.shape[:-2], np.nan)
    if not 0 <= q_start <= k - q:
        raise AnalysisError(
            f"segments needs the query rows among the keys: 0 <= q_start <= k - q; got q_start={q_start}."
        )
    same = ids[q_start : q_start + q, None] == ids[None, :]
    return np.asarray((attn * same).sum(axis=(-2, -1), dtype=np.float64))


def _key_flags(flags: npt.ArrayLike, k: int, name: str) -> npt.NDArray[np.bool_]:
    marked = np.asarray(flags)
    if marked.dtype != np.bool_ or marked.shape != (k,):
        raise AnalysisError(f"{name} must be bool [k] with k={k}; got {marked.dtype} shaped {marked.shape}.")
    return marked
