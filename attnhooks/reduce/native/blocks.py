"""The torch side of the C row kernel: one block's reductions, in buffers reused block after block."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from attnhooks.attention.kernels import EXP_FLOOR
from attnhooks.reduce.native import Block


@dataclass(frozen=True)
class Layout:
    """What stays the same for every block of one call."""

    batch: int
    topk: int  # 0: none
    tb: int  # keys per group of the top-k search
    band: int  # 0: none
    sinks: bool
    rb: int  # rows per row bin (the overview's; with no overview, a block is one row bin)
    cb: int  # keys per overview bin (0: no overview)


class NativeBlocks:
    """Runs ``attnhooks_summary_block`` on blocks of log-probabilities ``[batch, h, r, n]`` and
    returns their block-local reductions (views of buffers the next block overwrites)."""

    def __init__(self, kernel: Any, layout: Layout) -> None:
        self.kernel, self.layout = kernel, layout
        self._buffers: dict[str, torch.Tensor] = {}

    def run(
        self,
        logp: torch.Tensor,
        *,
        own: int,
        causal: bool,
        window: int | None,
        band_own: int,
        sinks: int,
        index_base: int,
    ) -> dict[str, torch.Tensor]:
        """The block's reductions; ``logp`` (contiguous float32, ``-inf`` where hidden) becomes its
        probabilities.

        Args:
            logp: ``[batch, h, r, n]`` ``s·scale - lse`` of ``r`` query rows by ``n`` keys.
            own: key index (in the block) of row 0's own position, for ``causal`` and ``window``.
            causal, window: hide keys after the row's position / ``window`` or more before it.
            band_own: key index of row 0's band diagonal.
            sinks: leading keys of the block that ``sink`` sums.
            index_base: added to the top-k indices (the block's first key).

        Returns:
            ``entropy``, ``sink``, ``band``, ``topk_weight``, ``topk_index`` (int32) shaped
            ``[batch, h, r, ...]`` as wanted; ``sums [batch, h, row bins, n]`` (column sums per row
            bin) and, with an overview, ``peak [batch, h, row bins, ceil(n / cb)]``.
        """
        lay = self.layout
        b, h, r, n = logp.shape
        heads = b * h
        rb = lay.rb if lay.cb else r
        nrb = math.ceil(r / rb)
        threads = torch.get_num_threads()
        parts = max(1, min(rb, math.ceil(2 * threads / (heads * nrb))))  # >= 2 tasks per thread
        cell = math.ceil(rb / parts)
        parts = math.ceil(rb / cell)
        nkb = math.ceil(n / lay.cb) if lay.cb else 0
        out = {"entropy": self._buffer("entropy", (heads, r))}
        if lay.sinks:
            out["sink"] = self._buffer("sink", (heads, r))
        if lay.band:
            out["band"] = self._buffer("band", (heads, r, lay.band))
        if lay.topk:
            out["topk_weight"] = self._buffer("topk_weight", (heads, r, lay.topk))
            out["topk_index"] = self._buffer("topk_index", (heads, r, lay.topk), torch.int32)
        colsum = self._buffer("colsum", (heads, nrb * parts, n))
        pmax = self._buffer("pmax", (heads, nrb * parts, nkb)) if nkb else None
        block = Block(
            x=logp.data_ptr(),
            heads=heads,
            rows=r,
            n=n,
            own=own,
            causal=int(causal),
            window=-1 if window is None else window,
            floor=EXP_FLOOR,
            entropy=out["entropy"].data_ptr(),
            sink=_address(out.get("sink")),
            sinks=sinks,
            band=_address(out.get("band")),
            band_width=lay.band,
            band_own=band_own,
            topw=_address(out.get("topk_weight")),
            topi=_address(out.get("topk_index")),
            topk=lay.topk,
            tb=lay.tb,
            index_base=index_base,
            colsum=colsum.data_ptr(),
            pmax=_address(pmax),
            rb=rb,
            parts=parts,
            cell=cell,
            cb=lay.cb or 1,
            nkb=nkb,
            threads=threads,
        )
        if self.kernel(ctypes.byref(block)) != 0:
            raise MemoryError("attnhooks: the summary kernel could not allocate its scratch rows")
        result = {name: t.view(b, h, *t.shape[1:]) for name, t in out.items()}
        sums = colsum.view(b, h, nrb, parts, n)
        result["sums"] = sums.sum(3) if parts > 1 else sums[:, :, :, 0]
        if pmax is not None:
            peak = pmax.view(b, h, nrb, parts, nkb)
            result["peak"] = peak.amax(3) if parts > 1 else peak[:, :, :, 0]
        return result

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self._buffers[name] = torch.empty(size, dtype=dtype)
        return buf[:size].view(shape)


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
