"""Attention masks as the kernel saw them, in a compact form when one exists.

A :class:`MaskSpec` rebuilds exactly the mask that an attention call used: causal alignment,
key padding and sliding window when the mask is expressible that way, otherwise the mask tensor
itself (bool: True means "may attend"; float: added to the scores, as T5's position bias).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["MaskSpec", "unmasked"]


@dataclass(frozen=True)
class MaskSpec:
    """What query row ``i`` of a call may attend to, for every key ``j``.

    Attributes:
        causal: keys after the query's own position are hidden: ``j <= i + offset``.
        offset: position of query row 0 among the keys for ``causal`` and ``window``
            (``k_len - q_len`` for a KV-cache continuation, 0 for SDPA's ``is_causal``).
        window: sliding window: additionally ``i + offset - j < window``; None for no window.
        key_valid: bool ``[batch, k_len]``, False for padded keys; None when all keys are valid.
        dense: the mask exactly as given to the kernel, broadcastable to
            ``[batch, heads, q_len, k_len]``; bool (True = attend) or float (added to scores).
            Set only when the mask has no compact form; then the other fields are ignored.
    """

    causal: bool = False
    offset: int = 0
    window: int | None = None
    key_valid: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def is_trivial(self) -> bool:
        """True when every query may attend to every key."""
        return not self.causal and self.window is None and self.key_valid is None and self.dense is None

    @classmethod
    def from_kernel(cls, mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int) -> MaskSpec:
        """Describe the mask of an SDPA-style call (``attn_mask``, ``is_causal``).

        A boolean (or 0/-inf) mask that is causal-with-padding or padding-only is stored as
        ``key_valid`` plus flags; anything else (a float bias, a per-head mask) as ``dense``.
        """
        if mask is None:
            return unmasked(is_causal)
        mask = mask.detach()
        allowed = _as_allowed(mask)
        if allowed is None or is_causal:
            return cls(causal=is_causal, dense=mask.to("cpu", copy=True))
        compact = _compact(allowed, q_len, k_len)
        return compact if compact is not None else cls(dense=mask.to("cpu", copy=True))

    def additive(
        self, batch: int, q_len: int, k_len: int, rows: slice | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """Float32 mask to add to the scores, broadcastable to ``[batch, heads, rows, k_len]``.

        Args:
            batch, q_len, k_len: the call's sizes.
            rows: the query rows wanted (default: all ``q_len`` rows).
            device: where to build it.

        Returns:
            ``0`` where attention is allowed and ``-inf`` where not, shaped
            ``[batch | 1, heads | 1, len(rows), k_len]``; None when nothing is masked.
        """
        rows = rows or slice(0, q_len)
        dense = self._dense_rows(rows, device)
        if dense is not None and dense.dtype != torch.bool:
            return dense.float()
        allowed = dense if dense is not None else self._allowed(q_len, k_len, rows, device)
        if allowed is None:
            return None
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return torch.where(allowed, zero, float("-inf"))

    def visible_keys(self, q_len: int, k_len: int, rows: slice) -> int:
        """How many leading keys the query ``rows`` can see at most (fewer than ``k_len`` when causal)."""
        return self.visible_range(q_len, k_len, rows)[1]

    def visible_range(self, q_len: int, k_len: int, rows: slice) -> tuple[int, int]:
        """Keys ``[first, stop)`` outside of which none of the query ``rows`` sees a key: a causal
        mask hides the keys after the last row, a sliding window those before the first row's window."""
        if self.dense is not None:
            return 0, k_len
        first_row = rows.start or 0
        last_row = min(rows.stop if rows.stop is not None else q_len, q_len) - 1
        stop = max(0, min(k_len, last_row + self.offset + 1)) if self.causal else k_len
        first = 0 if self.window is None else min(stop, max(0, first_row + self.offset - self.window + 1))
        return first, stop

    def bias_block(self, rows: slice, keys: slice, heads: slice, device: torch.device | str) -> torch.Tensor | None:
        """A float ``dense`` mask's values for a block ``[batch|1, len(heads)|1, len(rows)|1, len(keys)]``
        (to add to its scores); None for any other mask."""
        dense = self._dense_block(rows, keys, heads, device)
        return dense.float() if dense is not None and dense.dtype != torch.bool else None

    def hide_block_(
        self,
        x: torch.Tensor,
        q_len: int,
        rows: slice,
        keys: slice,
        heads: slice,
        fill: float,
        tiles: list[tuple[slice, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Set ``x [batch, len(heads), len(rows), len(keys)]`` (scores or probabilities of a block) to
        ``fill`` in place wherever the key is hidden (for a float ``dense`` mask: where it is ``-inf``).

        Causal and window masks touch only the key columns that some row of the block cannot see (a
        tile as wide as the block is tall at each edge), not the whole block; ``tiles`` are those
        of :meth:`edge_tiles` when the caller kept them (blocks of other heads, same rows and keys)."""
        self.hide_listed_(x, rows, keys, heads, fill)
        if self.dense is None:
            for cols, hidden in self.edge_tiles(rows, keys, x.device) if tiles is None else tiles:
                x[..., cols].masked_fill_(hidden, fill)
        return x

    def hide_listed_(self, x: torch.Tensor, rows: slice, keys: slice, heads: slice, fill: float) -> torch.Tensor:
        """The part of :meth:`hide_block_` that the mask's tensors say (a ``dense`` mask, else key
        padding), not the causal / window positions: for a caller that hides those by index."""
        dense = self._dense_block(rows, keys, heads, x.device)
        if dense is not None:
            return x.masked_fill_(~dense if dense.dtype == torch.bool else torch.isneginf(dense), fill)
        if self.key_valid is not None:
            x.masked_fill_(~self.key_valid.to(x.device)[:, None, None, keys], fill)
        return x

    def edge_tiles(self, rows: slice, keys: slice, device: torch.device | str) -> list[tuple[slice, torch.Tensor]]:
        """The causal / window mask of a block of query ``rows`` x ``keys`` where it hides anything:
        ``(columns within the block, hidden [len(rows), columns])`` for the keys after the first row
        (causal) and those before the last row's window."""
        spans = []
        if self.causal:
            spans.append((max(keys.start, rows.start + self.offset + 1), keys.stop))
        if self.window is not None:
            spans.append((keys.start, min(keys.stop, rows.stop + self.offset - self.window)))
        i = torch.arange(rows.start, rows.stop, device=device)[:, None] + self.offset
        tiles = []
        for lo, hi in spans:
            if hi > lo:
                j = torch.arange(lo, hi, device=device)
                hidden = (j > i) if self.causal else torch.zeros((), dtype=torch.bool, device=device)
                if self.window is not None:
                    hidden = hidden | (i - j >= self.window)
                tiles.append((slice(lo - keys.start, hi - keys.start), hidden))
        return tiles

    def _dense_block(self, rows: slice, keys: slice, heads: slice, device: torch.device | str) -> torch.Tensor | None:
        dense = self._dense_rows(rows, device)
        if dense is None:
            return None
        return dense[:, heads, :, keys] if dense.shape[1] != 1 else dense[..., keys]

    def hides_keys_from(self, n: int, q_len: int, k_len: int) -> bool:
        """True when every query row is kept from every key at position ``n`` or later (a static KV
        cache's unwritten slots)."""
        if self.dense is not None:
            tail = self.dense[..., n:]
            return bool((~tail).all()) if tail.dtype == torch.bool else bool(torch.isneginf(tail).all())
        if self.causal and self.key_valid is None and q_len - 1 + self.offset < n:
            return True
        allowed = self._allowed(q_len, k_len, slice(0, q_len), "cpu")
        return allowed is not None and not bool(allowed[..., n:].any())

    def first_keys(self, n: int, q_len: int, k_len: int) -> MaskSpec:
        """The mask over the first ``n`` of its ``k_len`` keys, in its compact form where it has one."""
        if self.dense is not None:
            return MaskSpec.from_kernel(self.dense[..., :n], False, q_len, n)
        allowed = self._allowed(q_len, k_len, slice(0, q_len), "cpu")
        return MaskSpec() if allowed is None else MaskSpec.from_kernel(allowed[..., :n], False, q_len, n)

    @property
    def may_hide_whole_rows(self) -> bool:
        """False when every query row is guaranteed at least one visible key."""
        return not (self.dense is None and self.key_valid is None and self.window is None and self.offset >= 0)

    def apply_(self, scores: torch.Tensor, q_len: int, rows: slice) -> torch.Tensor:
        """Mask a block of scores in place: ``scores [batch, heads, len(rows), n]`` over keys ``[0, n)``;
        a float ``dense`` mask is added, hidden keys become ``-inf`` (see :meth:`hide_block_`).

        On a short block (``len(rows) * n`` up to 16384) a causal / window mask is added as a cached
        ``0 / -inf`` bias ``[len(rows), n]`` (one pass, no boolean mask built per call): a finite score
        is kept exactly where visible and becomes ``-inf`` where hidden, as a fill would make it."""
        keys = slice(0, scores.shape[-1])
        if self.dense is None and self.key_valid is None:  # causal / window only
            start = rows.start or 0
            stop = min(q_len if rows.stop is None else rows.stop, q_len)
            n = keys.stop
            hides = (self.causal and start + self.offset + 1 < n) or (
                self.window is not None and stop - 1 + self.offset >= self.window
            )
            if not hides:
                return scores
            if (stop - start) * n <= _SMALL_BIAS:  # a short call: one cached 0 / -inf bias, one pass
                edge = _edge_bias(start + self.offset, stop - start, n, self.causal, self.window, str(scores.device))
                return scores.add_(edge)
        bias = self.bias_block(rows, keys, slice(None), scores.device)
        if bias is not None:
            return scores.add_(bias)
        return self.hide_block_(scores, q_len, rows, keys, slice(None), float("-inf"))

    def _dense_rows(self, rows: slice, device: torch.device | str) -> torch.Tensor | None:
        """The dense mask as 4-D ``[batch|1, heads|1, len(rows)|1, k_len]``; None when compact."""
        if self.dense is None:
            return None
        dense = self.dense.to(device)
        while dense.dim() < 4:
            dense = dense.unsqueeze(0)
        return dense[..., rows, :] if dense.shape[-2] != 1 else dense

    def _allowed(self, q_len: int, k_len: int, rows: slice, device: torch.device | str) -> torch.Tensor | None:
        allowed: torch.Tensor | None = None
        if self.causal or self.window is not None:
            i = torch.arange(q_len, device=device)[rows].unsqueeze(-1) + self.offset
            j = torch.arange(k_len, device=device)
            allowed = j <= i if self.causal else torch.ones_like(j <= i)
            if self.window is not None:
                allowed = allowed & (i - j < self.window)
            allowed = allowed[None, None]
        if self.key_valid is not None:
            keys = self.key_valid.to(device)[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        return allowed


_SMALL_BIAS = 1 << 14  # elements of a cached bias (64 KiB): at most 128 of them are kept


@functools.lru_cache(maxsize=128)
def _edge_bias(first: int, n_rows: int, n_keys: int, causal: bool, window: int | None, device: str) -> torch.Tensor:
    """``[n_rows, n_keys]`` float32: ``-inf`` where a causal / window mask hides key ``j`` from the query
    row at position ``i = first + r`` (``j > i``; ``i - j >= window``), else 0. Built on the host (no
    device synchronisation) and cached: a model's short calls repeat a few shapes; never written to."""
    i = torch.arange(first, first + n_rows)[:, None]
    j = torch.arange(n_keys)
    hidden = (j > i) if causal else torch.zeros(n_rows, n_keys, dtype=torch.bool)
    if window is not None:
        hidden = hidden | (i - j >= window)
    return torch.zeros(n_rows, n_keys).masked_fill_(hidden, float("-inf")).to(device)


def _as_allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean "may attend" view of a mask, or None when it carries real-valued scores."""
    if mask.dtype == torch.bool:
        return mask
    finite = torch.isfinite(mask)
    if bool((mask[finite] == 0).all()) and bool((mask[~finite] < 0).all()):
        return finite
    return None


def _compact(allowed: torch.Tensor, q_len: int, k_len: int) -> MaskSpec | None:
    """Express a boolean mask as key padding, optionally causal (bottom-right aligned) with a
    sliding window."""
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if bool(allowed.all()):
        return MaskSpec()
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None
        allowed = allowed[:, :1]
    allowed = allowed.expand(allowed.shape[0], 1, q_len, k_len)
    key_valid = allowed[:, 0, -1, :]
    padding_only = MaskSpec(key_valid=key_valid.to("cpu", copy=True))
    if torch.equal(allowed, key_valid[:, None, None, :].expand_as(allowed)):
        return padding_only
    offset = k_len - q_len
    seen = allowed[:, 0].any(dim=-2)  # keys some row sees: under a window, more than the last row
    keys = None if bool(seen.all()) else seen.to("cpu", copy=True)
    for window in (None, _window(allowed, offset)):
        spec = MaskSpec(causal=True, offset=offset, window=window, key_valid=keys)
        rebuilt = spec._allowed(q_len, k_len, slice(0, q_len), allowed.device)
        if rebuilt is not None and torch.equal(allowed, rebuilt.expand_as(allowed)):
            return spec
    return None


def _window(allowed: torch.Tensor, offset: int) -> int | None:
    """The sliding window a causal mask ``[batch, 1, q_len, k_len]`` may have: the widest span from
    a row's earliest visible key to its own position (None when no row sees any key)."""
    q_len = allowed.shape[-2]
    seen = allowed.any(dim=-1)
    if not bool(seen.any()):
        return None
    first = torch.where(seen, allowed.float().argmax(dim=-1), 0)
    own = torch.arange(q_len, device=allowed.device) + offset
    return int(torch.where(seen, own - first + 1, 0).max())


_UNMASKED = (MaskSpec(), MaskSpec(causal=True))


def unmasked(causal: bool = False) -> MaskSpec:
    """``MaskSpec(causal=causal)``, one instance each (a MaskSpec is frozen): the mask of most calls,
    made without a frozen dataclass's ``__init__`` on the hot path."""
    return _UNMASKED[1 if causal else 0]
