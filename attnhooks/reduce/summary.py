"""Blockwise reductions of one attention call, computed where the model runs, never holding n x n.

A block is a few query heads by at most ``block`` query rows by the keys those rows can see
(about 8 MiB of scores, so that every pass over it runs from cache); its probabilities are
``exp(s - lse)`` with the row log-sum-exp the kernel returned (or one computed beforehand), and
``s·scale - lse`` is one matrix product. Under a causal or sliding-window mask only the keys a
block can see are scored. On the CPU, one pass of attnhooks' C kernel (:mod:`attnhooks.native`)
over each block's log-probabilities computes every row reduction below; where it is not built, and
on other devices, torch's ops do (there only the tiles at a mask's edges are masked, and log p is
floored at ``EXP_FLOOR`` before the exp, in both paths). What each block contributes:

* ``entropy [B, H, q]``: ``-sum_j p_j log p_j`` (nats), with ``log p = s - lse``.
* ``topk_index [B, H, q, K]`` (int32) and ``topk_weight [B, H, q, K]``: the K most attended keys,
  found among the keys of the K key groups with the largest maxima (groups of ~32 keys: a key
  outside them has K larger keys ahead of it): two small searches instead of one over every key.
* ``received [B, H, k]``: attention received per key, summed over the rows (column sums).
* ``sink [B, H, q]``: mass on the first ``sinks`` keys.
* ``band [B, H, q, W]``: ``band[..., i, w]`` is the weight on key ``pos(i) - w``, the query's own
  position and the W - 1 keys before it (0 where that key does not exist).
* ``pooled_max`` / ``pooled_mean [B, H, P_q, P_k]``: an overview map; rows and keys pooled into
  bins of ``ceil(q / P)`` rows by ``ceil(k / P)`` keys; ``pooled_bins [B, 4]`` (int64) holds
  ``(rows per bin, keys per bin, P_q, P_k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnhooks.attention.kernels import EXP_FLOOR, isolated
from attnhooks.attention.masks import MaskSpec
from attnhooks.errors import RecordOptionError, ShapeError
from attnhooks.reduce import native
from attnhooks.reduce.native.blocks import Layout, NativeBlocks
from attnhooks.schema import ROWWISE, SUMMARY

__all__ = ["ROWWISE", "SUMMARY", "SummaryOptions", "summarize_call"]

_BLOCK_BYTES = 8 << 20  # one block's scores: passes over it stay in cache (measured: 2-4x faster than 64 MiB)
_TOPK_BIN = 32  # keys per bin of the top-k search
_SHARE_BIN = 16  # overview key bins at least this wide are the top-k bins too (one max pass)


@dataclass(frozen=True)
class SummaryOptions:
    """What ``record="summary"`` computes per call.

    Attributes:
        topk: keys kept per row by ``topk_index`` / ``topk_weight`` (0: none).
        sinks: leading keys counted by ``sink`` (0: no ``sink``).
        band: diagonals kept by ``band`` (the row's own position and the ``band - 1`` before it;
            0: no ``band``).
        pooled: side of the overview maps (at most ``pooled x pooled``; 0: no overview).
        Entropy and the attention received per key are always computed; turning the others off
        makes a summary cheaper on torch's path (top-k and the overview are its costly passes; the
        C kernel's one pass costs about the same with or without them).
        block: query rows per block at most; fewer (whole overview row bins, at least one) when a
            block's scores would pass 8 MiB, so memory stays bounded at any length: two such
            buffers, a float32 copy of the keys its heads read and the outputs are what a summary
            allocates.
    """

    topk: int = 8
    sinks: int = 4
    band: int = 64
    pooled: int = 256
    block: int = 1024

    def __post_init__(self) -> None:
        for name in ("topk", "sinks", "band", "pooled", "block"):
            value = getattr(self, name)
            least = 1 if name == "block" else 0
            if not isinstance(value, int) or value < least:
                raise RecordOptionError(f"summary option {name}={value!r}: use an int >= {least}")


def summarize_call(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    mask: MaskSpec | None,
    softcap: float | None = None,
    q_start: int = 0,
    key_start: int = 0,
    options: SummaryOptions = SummaryOptions(),
) -> dict[str, torch.Tensor]:
    """The reductions of one call (see the module docstring), on the device of ``q``.

    Args:
        q: ``[batch, heads, q_len, head_dim]``; k: ``[batch, kv_heads, k_len, head_dim]``.
        lse: ``[batch, heads, q_len]`` row log-sum-exp of the masked scores (``-inf``: no key).
        scale, mask, softcap: as the kernel applied them.
        q_start: position of query row 0 among the keys (for ``band``): ``k_len - q_len`` for
            causal self-attention aligned at the end, 0 for SDPA's ``is_causal``.
        key_start: stream position of key 0 (a rolling cache dropped that many keys): ``sink``
            counts the keys at positions below ``sinks``; everything else is in the keys' own
            indices.
        options: sizes of top-k, sinks, band, overview and blocks.

    Returns:
        name -> tensor, float32 unless said otherwise; see :data:`SUMMARY`.
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ShapeError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    plan = _Plan.make(batch, heads, kv_heads, q_len, k_len, options)
    dev = q.device
    with isolated(dev):
        out = plan.outputs(dev)
        work = _Work(plan, q, k, lse, scale, softcap, mask, max(0, options.sinks - key_start), q_start)
        for start in range(0, q_len, plan.rows):
            rows = work.rows(slice(start, min(start + plan.rows, q_len)))
            for heads_ in plan.head_blocks():
                work.block(out, heads_, rows)
        out["received"] = out["received"].float()
        if options.pooled:
            out["pooled_bins"] = torch.tensor([[plan.rb, plan.cb, plan.pq, plan.pk]], device=dev).expand(batch, 4)
            out["pooled_bins"] = out["pooled_bins"].contiguous()
            out["pooled_mean"] = (out["pooled_mean"] / _cells(q_len, k_len, plan.rb, plan.cb, dev)).float()
    return out


@dataclass(frozen=True)
class _Plan:
    """Sizes of one call's reductions and of its blocks.

    A block is ``heads`` query heads (a divisor or a multiple of the GQA group, so that they read
    one key head or whole groups) by ``rows`` query rows (whole overview row bins) by the keys those
    rows can see, about ``_BLOCK_BYTES`` of float32 scores: small enough that the passes over it
    run from cache. ``bin`` is the key bin of the top-k search (the overview's key bin when that is
    wide enough to share one max pass).
    """

    batch: int
    heads: int
    group: int
    q_len: int
    k_len: int
    options: SummaryOptions
    rb: int
    cb: int
    pq: int
    pk: int
    rows: int
    head_block: int
    bin: int

    @classmethod
    def make(cls, batch: int, heads: int, kv_heads: int, q_len: int, k_len: int, opt: SummaryOptions) -> _Plan:
        # without an overview, rows are not binned (a block is not forced to hold every row)
        rb, cb = 1, 1
        if opt.pooled:
            rb, cb = math.ceil(max(q_len, 1) / opt.pooled), math.ceil(max(k_len, 1) / opt.pooled)
        row_bytes = 4 * batch * max(k_len, 1)
        fit = max(1, _BLOCK_BYTES // row_bytes)
        rows = max(rb, min(opt.block, fit) // rb * rb)
        group = heads // kv_heads
        fit_heads = max(1, _BLOCK_BYTES // (row_bytes * rows))
        if fit_heads >= group:
            head_block = min(heads, fit_heads // group * group)
        else:
            head_block = max(d for d in range(1, group + 1) if group % d == 0 and d <= fit_heads)
        bin_ = _TOPK_BIN  # the overview's key bins, when they are wide enough, or a multiple of them
        if opt.pooled:
            bin_ = cb if cb >= _SHARE_BIN else cb * math.ceil(_TOPK_BIN / cb)
        return cls(
            batch,
            heads,
            group,
            q_len,
            k_len,
            opt,
            rb,
            cb,
            math.ceil(q_len / rb),
            math.ceil(k_len / cb),
            rows,
            head_block,
            bin_,
        )

    def head_blocks(self) -> list[slice]:
        return [slice(h, min(h + self.head_block, self.heads)) for h in range(0, self.heads, self.head_block)]

    def outputs(self, dev: torch.device) -> dict[str, torch.Tensor]:
        b, h, q_len, opt = self.batch, self.heads, self.q_len, self.options
        out = {
            "entropy": torch.empty(b, h, q_len, device=dev),
            "received": torch.zeros(b, h, self.k_len, dtype=torch.float64, device=dev),
        }
        top = min(opt.topk, self.k_len)
        if top:
            out["topk_index"] = torch.empty(b, h, q_len, top, dtype=torch.int32, device=dev)
            out["topk_weight"] = torch.empty(b, h, q_len, top, device=dev)
        if opt.sinks:
            out["sink"] = torch.empty(b, h, q_len, device=dev)
        if opt.band:
            out["band"] = torch.zeros(b, h, q_len, opt.band, device=dev)
        if opt.pooled:
            out["pooled_max"] = torch.zeros(b, h, self.pq, self.pk, device=dev)
            out["pooled_mean"] = torch.zeros(b, h, self.pq, self.pk, dtype=torch.float64, device=dev)
        return out


@dataclass(frozen=True)
class _Rows:
    """A block of query rows and what every head's block over them shares (see ``_Work.rows``)."""

    rows: slice
    keys: slice
    tiles: list[tuple[slice, torch.Tensor]]
    band: tuple[torch.Tensor, torch.Tensor] | None


class _Work:
    """One call's inputs and the two block buffers (log-probabilities and probabilities) reused
    by every block."""

    def __init__(
        self,
        plan: _Plan,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
        softcap: float | None,
        mask: MaskSpec | None,
        sinks: int,
        q_start: int,
    ) -> None:
        self.plan, self.q, self.scale, self.softcap = plan, q, scale, softcap
        self.mask = mask if mask is not None and not mask.is_trivial else None
        hidden = torch.isneginf(lse)  # rows that see no key: every key of theirs is masked below
        self.lse = torch.where(hidden, 0.0, lse) if bool(hidden.any()) else lse
        self.sinks, self.q_start = sinks, q_start
        self.top = min(plan.options.topk, plan.k_len)
        size = plan.batch * plan.head_block * plan.rows * plan.k_len
        self.logp_buf = torch.empty(size, device=q.device)
        kernel = native.summary_kernel() if q.device.type == "cpu" else None
        self.native = None if kernel is None else NativeBlocks(kernel, self._layout())
        self.p_buf = torch.empty(0 if self.native else size, device=q.device)
        self.bin_keys = torch.arange(plan.bin, device=q.device)
        # [k, 1]: with [q·scale, -lse] one product gives s·scale - lse: one float32 copy of the keys
        # per call instead of a pass over every block to subtract the lse (not when soft-capped)
        self.key_ones = (
            k.float()
            if softcap is not None
            else torch.cat([k.float(), k.new_ones(*k.shape[:-1], 1, dtype=torch.float32)], -1)
        )

    def _layout(self) -> Layout:
        plan, opt = self.plan, self.plan.options
        return Layout(plan.batch, self.top, _TOPK_BIN, opt.band, bool(opt.sinks), plan.rb, plan.cb if opt.pooled else 0)

    def rows(self, rows: slice) -> _Rows:
        """What the blocks of every head over these query rows share: the keys they score (those
        the rows can see, widened to whole top-k / overview key bins at the start and to at least
        ``top`` keys), the mask's edge tiles and the band's gather index."""
        plan, dev = self.plan, self.q.device
        first, stop = self.mask.visible_range(plan.q_len, plan.k_len, rows) if self.mask else (0, plan.k_len)
        first = first // plan.bin * plan.bin
        if stop - first < self.top:
            first, stop = 0, max(stop, self.top)
        keys = slice(first, stop)
        if self.native is not None:  # the kernel masks by index and reads the band itself
            return _Rows(rows, keys, [], None)
        tiles = self.mask.edge_tiles(rows, keys, dev) if self.mask is not None else []
        band = None
        if plan.options.band:  # row i reads key q_start + i - w, as a column of the scored keys
            n = stop - first
            local = torch.arange(rows.start, rows.stop, device=dev)[:, None] + (self.q_start - first)
            local = local - torch.arange(plan.options.band, device=dev)[None, :]  # [r, W]
            band = (local.clamp(0, max(n - 1, 0)), (local >= 0) & (local < n))
        return _Rows(rows, keys, tiles, band)

    def block(self, out: dict[str, torch.Tensor], heads: slice, at_rows: _Rows) -> None:
        """Add one block (``heads`` x the rows of ``at_rows``) to every reduction."""
        parts = self._native_parts(heads, at_rows) if self.native is not None else self._torch_parts(heads, at_rows)
        plan, rows, keys = self.plan, at_rows.rows, at_rows.keys
        at = (slice(None), heads, rows)
        for name in ("entropy", "sink", "band", "topk_weight", "topk_index"):
            if name in parts:
                out[name][at] = parts[name]
        sums = parts["sums"]  # [B, h, row bins, n]: float32 within a block, float64 across
        out["received"][:, heads, keys] += sums.sum(2)
        if plan.options.pooled:  # blocks hold whole row bins but the last; they start at a whole key bin
            peak = parts["peak"]
            bins = (
                slice(None),
                heads,
                slice(rows.start // plan.rb, rows.start // plan.rb + peak.shape[2]),
                slice(keys.start // plan.cb, keys.start // plan.cb + peak.shape[3]),
            )
            torch.maximum(out["pooled_max"][bins], peak, out=out["pooled_max"][bins])
            out["pooled_mean"][bins] += _bin_reduce(sums, plan.cb, -1, torch.sum)

    def _native_parts(self, heads: slice, at_rows: _Rows) -> dict[str, torch.Tensor]:
        """The block's reductions by the C kernel: one pass over its log-probabilities."""
        assert self.native is not None
        rows, keys, mask = at_rows.rows, at_rows.keys, self.mask
        logp = self._log_probabilities(heads, at_rows)
        offset, causal, window = 0, False, None
        if mask is not None:
            if _hidden_by_value(mask):
                mask.hide_listed_(logp, rows, keys, heads, -math.inf)
            if mask.dense is None:  # causal and window: the kernel hides them by index
                offset, causal, window = mask.offset, mask.causal, mask.window
        return self.native.run(
            logp,
            own=rows.start + offset - keys.start,
            causal=causal,
            window=window,
            band_own=self.q_start + rows.start - keys.start,
            sinks=max(0, self.sinks - keys.start),
            index_base=keys.start,
        )

    def _torch_parts(self, heads: slice, at_rows: _Rows) -> dict[str, torch.Tensor]:
        """The block's reductions in torch (any device)."""
        plan, opt, keys = self.plan, self.plan.options, at_rows.keys
        logp, p = self._probabilities(heads, at_rows)
        parts = {"entropy": torch.einsum("bhij,bhij->bhi", p, logp).neg_()}  # p = 0 where log p = fill
        if opt.sinks:
            parts["sink"] = p[..., : max(0, self.sinks - keys.start)].sum(-1)
        if at_rows.band is not None:
            index, valid = at_rows.band
            parts["band"] = torch.gather(p, -1, index.expand(*p.shape[:2], -1, -1)).mul_(valid)
        peaks = _bin_reduce(p, plan.bin, -1, torch.amax) if self.top or opt.pooled else None
        if self.top:
            assert peaks is not None
            weight, index = _topk(p, peaks, self.top, self.bin_keys)
            parts["topk_weight"], parts["topk_index"] = weight, (index + keys.start).int()
        parts["sums"] = _bin_reduce(p, plan.rb, -2, torch.sum) if opt.pooled else p.sum(2, keepdim=True)
        if opt.pooled:
            if peaks is not None and plan.bin == plan.cb:
                parts["peak"] = _bin_reduce(peaks, plan.rb, -2, torch.amax)
            else:  # narrow key bins: rows first (an elementwise max of whole rows runs vectorised)
                parts["peak"] = _bin_reduce(_bin_reduce(p, plan.rb, -2, torch.amax), plan.cb, -1, torch.amax)
        return parts

    def _probabilities(self, heads: slice, at_rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p`` and ``p`` of the block ``[B, len(heads), len(rows), len(keys)]`` (in the reused
        buffers). Hidden keys have ``p = 0`` (their ``log p`` is finite: ``p log p`` is 0, not NaN);
        ``log p`` is at least ``EXP_FLOOR``."""
        plan, rows, keys = self.plan, at_rows.rows, at_rows.keys
        logp = self._log_probabilities(heads, at_rows)
        logp.clamp_min_(EXP_FLOOR)
        p = torch.exp(logp, out=self.p_buf[: logp.numel()].view(logp.shape))
        if self.mask is not None:
            self.mask.hide_block_(p, plan.q_len, rows, keys, heads, 0.0, at_rows.tiles)
        return logp, p

    def _log_probabilities(self, heads: slice, at_rows: _Rows) -> torch.Tensor:
        """``s·scale - lse`` (capped, plus a float mask's bias) of the block ``[B, len(heads),
        len(rows), len(keys)]``, in the reused buffer; keys the mask hides otherwise are not hidden."""
        plan, rows, keys = self.plan, at_rows.rows, at_rows.keys
        b, h, r, n = plan.batch, heads.stop - heads.start, rows.stop - rows.start, keys.stop - keys.start
        group = min(h, plan.group)  # query heads per key head in this block
        kv = slice(heads.start // plan.group, (heads.stop - 1) // plan.group + 1)
        q, lse = self.q[:, heads, rows].float(), self.lse[:, heads, rows, None]
        if self.softcap is None:
            q = torch.cat([q * self.scale, -lse], dim=-1)
        kt = self.key_ones[:, kv, keys].reshape(b * (h // group), n, -1).transpose(1, 2)
        logp = self.logp_buf[: b * h * r * n].view(b * (h // group), group * r, n)
        torch.bmm(q.reshape(b * (h // group), group * r, -1), kt, out=logp)
        logp = logp.view(b, h, r, n)
        if self.softcap is not None:
            logp.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap).sub_(lse)
        bias = self.mask.bias_block(rows, keys, heads, logp.device) if self.mask is not None else None
        if bias is not None:
            logp.add_(bias)
        return logp


def _hidden_by_value(mask: MaskSpec) -> bool:
    """Whether the kernel needs ``-inf`` in log p where ``mask`` hides keys: key padding and boolean
    dense masks (a float mask's ``-inf`` came with its bias; causal and window: by index)."""
    if mask.dense is not None:
        return mask.dense.dtype == torch.bool
    return mask.key_valid is not None


def _bin_reduce(x: torch.Tensor, size: int, dim: int, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op`` over consecutive bins of ``size`` along ``dim`` (-1 or -2); the last bin may be short."""
    n = x.shape[dim]
    full = n // size * size
    shape = list(x.shape)
    shape[dim : dim + 1 if dim != -1 else None] = [n // size, size]
    parts = [op(x.narrow(dim, 0, full).reshape(shape), dim=dim)] if full else []
    if full < n:
        parts.append(op(x.narrow(dim, full, n - full), dim=dim, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _topk(p: torch.Tensor, peaks: torch.Tensor, top: int, bin_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest ``p`` per row and their indices in the block: among the keys of the
    ``top`` bins (of ``len(bin_keys)`` keys) with the largest maxima (``peaks``), which hold them (a
    key outside those bins has ``top`` larger maxima, so ``top`` larger keys, ahead of it)."""
    n, size = p.shape[-1], bin_keys.shape[0]
    if peaks.shape[-1] <= 2 * top:
        return p.topk(top, dim=-1)
    bins = peaks.topk(top, dim=-1).indices  # [B, h, r, top]
    index = (bins[..., None] * size + bin_keys).flatten(-2)
    if n % size:  # the short last bin: its missing keys never win (p >= 0 elsewhere)
        outside = index >= n
        values = torch.gather(p, -1, index.clamp_(max=n - 1)).masked_fill_(outside, -1.0)
    else:
        values = torch.gather(p, -1, index)
    weight, pick = values.topk(top, dim=-1)
    return weight, torch.gather(index, -1, pick)


def _cells(q_len: int, k_len: int, rb: int, cb: int, device: torch.device) -> torch.Tensor:
    """How many matrix cells each overview bin covers (the last row / key bin may be short)."""
    rows = torch.full((math.ceil(q_len / rb),), rb, dtype=torch.float64, device=device)
    cols = torch.full((math.ceil(k_len / cb),), cb, dtype=torch.float64, device=device)
    if q_len % rb:
        rows[-1] = q_len % rb
    if k_len % cb:
        cols[-1] = k_len % cb
    return rows[:, None] * cols[None, :]
