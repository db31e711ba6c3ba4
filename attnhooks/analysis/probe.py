"""Which of two candidate words a token attends to more, per layer and head (bias probes)."""

from __future__ import annotations

import numpy as np

from attnhooks.analysis._common import AnalysisError, Array, check_attn, check_int

__all__ = ["bias_probe"]


def bias_probe(attn: Array, source: int, a: int, b: int, *, swapped: Array | None = None) -> Array:
    """Attention from ``source`` to candidate ``a`` minus to candidate ``b``, per layer and head.

    Typical use: a pronoun (``source``) and two antecedents, e.g. "The doctor (a) called the
    nurse (b) because she (source) ...". Without ``swapped`` the result is
    ``attn[..., source, a] - attn[..., source, b]``: positive when the source attends more to
    the token at ``a``. That mixes the word with its position (heads prefer near or early
    tokens). ``swapped`` removes the position effect: it is the attention of the counterfactual
    text in which the two candidate words traded places (word A now at ``b``, word B at ``a``,
    everything else, ``source`` included, at the same positions; the candidates must tokenise
    to the same number of tokens, or point ``a``/``b`` at their first tokens). The result is then
    the position-corrected preference for word A over word B::

        0.5 * ((orig[a] - orig[b]) + (swap[b] - swap[a]))

    A pure position preference ``orig[a] - orig[b] = swap[a] - swap[b] = d`` cancels; a pure
    word preference is kept whole.

    Args:
        attn: ``[..., n_q, n_k]`` attention, typically ``[layers, heads, n, n]`` (numpy or dask).
        source: query position of the token whose attention is probed.
        a, b: key positions of candidate A and candidate B in the original text.
        swapped: attention of the swapped text, the same shape as ``attn``.

    Returns:
        ``[...]`` float64 (``[layers, heads]``), positive where word A (or position ``a``) wins.

    Example:
        >>> import numpy as np
        >>> orig = np.zeros((1, 1, 4, 4)); orig[..., 3, :] = [0.1, 0.6, 0.2, 0.1]
        >>> swap = np.zeros((1, 1, 4, 4)); swap[..., 3, :] = [0.1, 0.4, 0.4, 0.1]
        >>> bias_probe(orig, 3, 1, 2).round(4)  # the token at position 1 gets 0.4 more
        array([[0.4]])
        >>> bias_probe(orig, 3, 1, 2, swapped=swap).round(4)  # word A over word B, position removed
        array([[0.2]])
    """
    check_attn(attn, layout="[..., n_q, n_k] (e.g. [layers, heads, n, n])")
    n_q, n_k = attn.shape[-2:]
    source = check_int(source, "source", minimum=0)
    a, b = check_int(a, "a", minimum=0), check_int(b, "b", minimum=0)
    if source >= n_q or max(a, b) >= n_k:
        raise AnalysisError(f"source must be < {n_q} and a, b < {n_k}; got source={source}, a={a}, b={b}.")
    if a == b:
        raise AnalysisError(f"a and b must be different positions; got a = b = {a}.")
    original = _difference(attn, source, a, b)
    if swapped is None:
        return original
    check_attn(swapped, name="swapped")
    if tuple(swapped.shape) != tuple(attn.shape):
        raise AnalysisError(f"swapped must have attn's shape {tuple(attn.shape)}; got {tuple(swapped.shape)}.")
    return 0.5 * (original + _difference(swapped, source, b, a))


def _difference(attn: Array, source: int, a: int, b: int) -> Array:
    return attn[..., source, a].astype(np.float64) - attn[..., source, b].astype(np.float64)
