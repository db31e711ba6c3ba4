"""Analysis of attention arrays: pure functions, numpy in, numpy (or dask) out.

Conventions shared by every function:

* An attention array is ``[..., heads, q, k]`` (any leading axes: layers, steps, batch). Rows are
  probability distributions over the keys; masked keys hold exactly 0.
* Rows may be a window of a longer sequence: query row ``r`` has position ``q_start + r`` among
  the keys' positions ``0 .. k-1`` (``q_start = k - q`` for the last ``q`` rows of causal
  self-attention, as with a KV cache). That is what lets a caller stream over row tiles.
* Per-row metrics return ``[..., heads, q]`` float64; per-head scores ``[..., heads]``. Sums are
  taken in float64.
* Per-row and per-head metrics use only array methods and numpy functions that dispatch through
  ``__array_function__``, so a dask array in gives a lazy dask array out. Whole-matrix results
  (:func:`head_similarity`, :func:`rollout`, :func:`head_pattern_scores`, :func:`summarize`) are
  numpy.

Example:
    >>> import numpy as np
    >>> from attnhooks import analysis
    >>> attn = np.tril(np.ones((4, 4)))
    >>> attn = (attn / attn.sum(-1, keepdims=True))[None]  # [heads=1, q=4, k=4], causal uniform
    >>> analysis.entropy(attn, normalize=True, n_keys=analysis.valid_keys(4, 4, causal=True))
    array([[0., 1., 1., 1.]])
"""

from attnhooks.analysis._common import AnalysisError
from attnhooks.analysis.classify import HEAD_CLASSES, HeadThresholds, classify_head, classify_heads, head_pattern_scores
from attnhooks.analysis.entropy import entropy, valid_keys
from attnhooks.analysis.mass import (
    attention_distance,
    next_mass,
    offset_mass,
    previous_mass,
    self_mass,
    sink_mass,
    token_class_mass,
)
from attnhooks.analysis.patterns import (
    duplicate_token_pattern,
    duplicate_token_score,
    induction_pattern,
    induction_score,
    pattern_score,
    previous_token_pattern,
    previous_token_score,
)
from attnhooks.analysis.probe import bias_probe
from attnhooks.analysis.rollout import rollout
from attnhooks.analysis.similarity import head_similarity, js_divergence
from attnhooks.analysis.stored import HeadTable, head_table
from attnhooks.analysis.summarize import SUMMARY_METRICS, summarize
from attnhooks.analysis.tokens import SPECIAL_TOKENS, punctuation, special_tokens

__all__ = [
    "HEAD_CLASSES",
    "SPECIAL_TOKENS",
    "SUMMARY_METRICS",
    "AnalysisError",
    "HeadTable",
    "HeadThresholds",
    "attention_distance",
    "bias_probe",
    "classify_head",
    "classify_heads",
    "duplicate_token_pattern",
    "duplicate_token_score",
    "entropy",
    "head_pattern_scores",
    "head_similarity",
    "head_table",
    "induction_pattern",
    "induction_score",
    "js_divergence",
    "next_mass",
    "offset_mass",
    "pattern_score",
    "previous_mass",
    "previous_token_pattern",
    "previous_token_score",
    "punctuation",
    "rollout",
    "self_mass",
    "sink_mass",
    "special_tokens",
    "summarize",
    "token_class_mass",
    "valid_keys",
]
