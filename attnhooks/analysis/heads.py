"""Per-head metrics of one sequence's attention, by name: the numbers a training run logs per layer x
head and the dynamics view draws across steps. Each one is a thin reduction of a function of this
package (no formula is written twice): the training callbacks (:mod:`attnhooks.integrations`) and the
dynamics view of a store (:mod:`attnhooks.viewer.dynamics`) both call :func:`sequence_metrics`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, check_attn
from attnhooks.analysis.entropy import entropy
from attnhooks.analysis.mass import attention_distance, sink_mass
from attnhooks.analysis.patterns import induction_score, previous_token_score

__all__ = ["HEAD_METRICS", "check_metrics", "sequence_metrics"]

HEAD_METRICS = ("entropy", "sink", "previous", "induction", "distance")
"""The metric names: ``entropy`` (mean row entropy, nats: :func:`~attnhooks.analysis.entropy`),
``sink`` (mean mass on key 0: :func:`~attnhooks.analysis.sink_mass`), ``previous``
(:func:`~attnhooks.analysis.previous_token_score`), ``induction``
(:func:`~attnhooks.analysis.induction_score`, needs the tokens; NaN on a sequence without a repeated
token) and ``distance`` (mean ``|i - j|`` weighted by attention:
:func:`~attnhooks.analysis.attention_distance`)."""


def check_metrics(metrics: Iterable[str] | str) -> tuple[str, ...]:
    """``metrics`` as a tuple of known names, in the given order; :class:`AnalysisError` names the known ones.

    Example:
        >>> check_metrics(["induction", "entropy"])
        ('induction', 'entropy')
    """
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if m not in HEAD_METRICS]
    if unknown or len(set(names)) != len(names):
        raise AnalysisError(
            f"metrics={names!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'a name is repeated'}; "
            f"use names from {HEAD_METRICS}, e.g. metrics=('induction', 'entropy'), or metrics=() for none"
        )
    return names


def sequence_metrics(
    attn: Array, metrics: Sequence[str], tokens: npt.ArrayLike | None = None, *, q_start: int | None = None
) -> dict[str, npt.NDArray[np.float64]]:
    """Each metric of the self-attention of one sequence (or of a batch of equally long ones), per head.

    Args:
        attn: ``[heads, q, k]``, or ``[batch, heads, q, k]``, attention probabilities (numpy).
        metrics: names from :data:`HEAD_METRICS` (checked with :func:`check_metrics`).
        tokens: ``[k]`` (or ``[batch, k]``) token ids or strings of the keys; needed by ``induction``
            (NaN without them).
        q_start: position of query row 0 among the keys; default ``k - q`` (the last rows).

    Returns:
        name -> float64 ``[heads]`` (or ``[batch, heads]``).

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]], dtype=float)
        >>> out = sequence_metrics(attn, ("induction", "previous", "sink"), tokens=[5, 6, 5, 6])
        >>> out["induction"], out["previous"], out["sink"]
        (array([1.]), array([1.]), array([0.5]))
    """
    check_attn(attn, ndim=3, layout="[heads, q, k] or [batch, heads, q, k]")
    if attn.ndim > 4:
        raise AnalysisError(f"attn must be [heads, q, k] or [batch, heads, q, k]; got shape {tuple(attn.shape)}.")
    q, k = attn.shape[-2:]
    start = k - q if q_start is None else q_start
    out: dict[str, npt.NDArray[np.float64]] = {}
    for name in check_metrics(metrics):
        if name == "entropy":
            out[name] = entropy(attn).mean(axis=-1)
        elif name == "sink":
            out[name] = sink_mass(attn, 1).mean(axis=-1)
        elif name == "previous":
            out[name] = previous_token_score(attn, q_start=start)
        elif name == "distance":
            out[name] = attention_distance(attn, q_start=start).mean(axis=-1)
        else:
            out[name] = _induction(attn, tokens, start)
    return out


def _induction(attn: Array, tokens: npt.ArrayLike | None, start: int) -> npt.NDArray[np.float64]:
    if tokens is None:
        return np.full(attn.shape[:-2], np.nan)
    ids = np.asarray(tokens)
    if attn.ndim == 3:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != (1 if attn.ndim == 3 else attn.shape[0]):
        raise AnalysisError(
            f"tokens shaped {np.shape(tokens)} do not match attn {tuple(attn.shape)}: give [k] or [batch, k]."
        )
    batch = attn[None] if attn.ndim == 3 else attn
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.stack([np.asarray(induction_score(batch[b], ids[b], q_start=start)) for b in range(ids.shape[0])])
    return np.asarray(scores[0] if attn.ndim == 3 else scores, dtype=np.float64)
