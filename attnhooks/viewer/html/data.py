"""The data an interactive view carries: attention (and q, k, masks) of one step, packed for a page.

Arrays travel inside the page as ``{"dtype", "shape", "codec": "shuffle+deflate", "data"}``: the
bytes of the array split into byte planes (as Blosc's shuffle does: the exponent bytes of
probabilities are alike and compress well), zlib-compressed, base64. The page unpacks them with the
browser's own ``DecompressionStream`` (no library, no request). Attention is float32 (every value as
the store holds it) unless ``precision="float16"`` (or ``"auto"`` past :data:`AUTO_FLOAT32_BYTES`),
which halves the file; the page then says its values are float16.

Numpy only: no torch, no matplotlib.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from attnhooks.errors import ViewError

if TYPE_CHECKING:
    from attnhooks.read.store import Store

__all__ = ["AUTO_FLOAT32_BYTES", "FORMAT", "LayerData", "ViewData", "from_arrays", "from_store", "pack", "unpack"]

FORMAT = "attnhooks-html/1"
AUTO_FLOAT32_BYTES = 32 * 2**20  # precision="auto": float32 attention up to this many raw bytes, float16 beyond
PRECISIONS = ("auto", "float32", "float16")


def pack(array: Any, dtype: str = "float32") -> dict[str, Any]:
    """An array as the page reads it: byte-shuffled, zlib-compressed, base64 (see the module docstring)."""
    a = np.ascontiguousarray(np.asarray(array), dtype=np.dtype(dtype).newbyteorder("<"))
    planes = a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T.tobytes()
    data = base64.b64encode(zlib.compress(planes, 6)).decode("ascii")
    return {"dtype": np.dtype(dtype).name, "shape": list(a.shape), "codec": "shuffle+deflate", "data": data}


def unpack(spec: dict[str, Any]) -> np.ndarray:
    """The array of :func:`pack` (what the page's ``unpack`` does, for tests and tools)."""
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    planes = np.frombuffer(zlib.decompress(base64.b64decode(spec["data"])), dtype=np.uint8)
    raw = planes.reshape(dtype.itemsize, -1).T.copy()
    out: np.ndarray = raw.view(dtype).reshape(spec["shape"])
    return out


@dataclass
class LayerData:
    """One module's call: ``attn [heads, q_len, k_len]``; for the query-key view ``q [heads, q_len, D]``,
    ``k [kv_heads, k_len, D]``, ``scale``, ``softcap``, ``allowed [q_len, k_len]`` (bool) and an additive
    ``bias [heads | 1, q_len, k_len]``; ``q_start``: the key position of query row 0."""

    name: str
    attn: np.ndarray
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    scale: float | None = None
    softcap: float = 0.0
    allowed: np.ndarray | None = None
    bias: np.ndarray | None = None
    q_start: int = 0

    def check(self) -> None:
        if self.attn.ndim != 3:
            raise ViewError(f"{self.name}: attention has shape {self.attn.shape}; expected [heads, q_len, k_len]")
        h, n_q, n_k = self.attn.shape
        if (self.q is None) != (self.k is None):
            raise ViewError(f"{self.name}: give both q and k (or neither) for the query-key view")
        if self.q is not None and self.k is not None:
            if self.q.ndim != 3 or self.q.shape[:2] != (h, n_q):
                raise ViewError(f"{self.name}: q has shape {self.q.shape}; expected [{h}, {n_q}, head_dim]")
            if self.k.ndim != 3 or self.k.shape[1:] != (n_k, self.q.shape[2]) or h % self.k.shape[0]:
                want = f"[kv_heads dividing {h}, {n_k}, {self.q.shape[2]}]"
                raise ViewError(f"{self.name}: k has shape {self.k.shape}; expected {want}")
        if self.allowed is not None and self.allowed.shape != (n_q, n_k):
            raise ViewError(f"{self.name}: mask has shape {self.allowed.shape}; expected [{n_q}, {n_k}]")

    def payload(self, dtype: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "attn": pack(self.attn, dtype), "q_start": self.q_start}
        if self.q is not None and self.k is not None:
            scale = self.scale if self.scale is not None else 1.0 / float(np.sqrt(self.q.shape[-1]))
            out.update(q=pack(self.q), k=pack(self.k), scale=float(scale), softcap=float(self.softcap))
            if self.allowed is not None:
                out["allowed"] = pack(self.allowed, "uint8")
            if self.bias is not None:
                out["bias"] = pack(self.bias)
        return out


@dataclass
class ViewData:
    """Everything a page shows: layers (one per module), token strings, a title, the precision."""

    layers: list[LayerData]
    tokens: list[str]
    title: str = "attnhooks"
    precision: str = "auto"
    views: tuple[str, ...] = ("head", "model", "qk")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def dtype(self) -> str:
        if self.precision not in PRECISIONS:
            raise ViewError(f"precision={self.precision!r}: use one of {PRECISIONS}")
        if self.precision != "auto":
            return self.precision
        raw = sum(layer.attn.size for layer in self.layers) * 4
        return "float32" if raw <= AUTO_FLOAT32_BYTES else "float16"

    def payload(self) -> dict[str, Any]:
        """The JSON object the page reads (``FORMAT``)."""
        for layer in self.layers:
            layer.check()
        dtype = self.dtype()
        return {
            "format": FORMAT,
            "title": self.title,
            "tokens": list(self.tokens),
            "precision": dtype,
            "views": list(self.views),
            "note": self.note,
            "layers": [layer.payload(dtype) for layer in self.layers],
            **self.extra,
        }


def from_arrays(
    attention: Any,
    tokens: Sequence[str] | None = None,
    *,
    q: Any = None,
    k: Any = None,
    scale: float | None = None,
    mask: Any = None,
    names: Sequence[str] | None = None,
) -> list[LayerData]:
    """Layers from arrays: ``attention`` ``[layers, heads, q, k]`` (or a list of ``[heads, q, k]``, or one
    ``[heads, q, k]``); ``q`` ``[layers, heads, q, D]`` and ``k`` ``[layers, kv_heads, k, D]`` (or lists);
    ``mask`` ``[q, k]`` bool (True: may attend) shared by the layers. Torch tensors are accepted."""
    layers = _per_layer(attention, "attention")
    qs = _per_layer(q, "q", len(layers)) if q is not None else [None] * len(layers)
    ks = _per_layer(k, "k", len(layers)) if k is not None else [None] * len(layers)
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(layers))]
    if len(names) != len(layers):
        raise ViewError(f"names has {len(names)} entries for {len(layers)} layers: give one name per layer")
    allowed = None if mask is None else _numpy(mask).astype(bool)
    out = [
        LayerData(name, a.astype(np.float32), qi, ki, scale, allowed=allowed)
        for name, a, qi, ki in zip(names, layers, qs, ks)
    ]
    for layer in out:
        layer.check()
    if tokens is not None and len(tokens) != out[0].attn.shape[-1]:
        raise ViewError(f"{len(tokens)} tokens for {out[0].attn.shape[-1]} keys: give one token per key")
    return out


def from_store(
    store: Store,
    modules: str | Sequence[str] | None = None,
    step: int | None = None,
    sample: int = 0,
    call: int = 0,
    *,
    method: str = "auto",
    qk: bool = True,
    max_tokens: int = 2048,
) -> tuple[list[LayerData], list[str]]:
    """Layers and token strings of one step, sample and call of a store (``modules``: names or globs,
    default the self-attention modules). ``qk``: also q, k and the mask where the store holds them.

    Raises:
        ViewError: a call longer than ``max_tokens`` keys (its attention would not fit a page: use
            ``attnhooks serve``, which reads tiles).
    """
    names = store.select(modules)
    layers = []
    for name in names:
        reader = store.call_reader(name, step, sample, call)
        if max(reader.q_len, reader.k_len) > max_tokens:
            raise ViewError(
                f"{name} has {reader.q_len} x {reader.k_len} positions, more than max_tokens={max_tokens}: "
                "a page holds every weight; use `attnhooks serve STORE` for long sequences, or raise max_tokens"
            )
        attn = store.attention(name, step, sample, call, method=method)
        layer = LayerData(name, attn, q_start=reader.query_start() if reader.q_len != reader.k_len else 0)
        if qk and reader.has("q") and reader.has("k") and reader.parent is None:
            info = reader.layout.info
            if int(info["k_offset"]) == 0 and int(info["k_stored"]) >= reader.k_len:
                rows, cols = slice(0, reader.q_len), slice(0, reader.k_len)
                heads = np.arange(reader.layout.heads)
                layer.q = store.q(name, step, sample, call).astype(np.float32)
                layer.k = store.k(name, step, sample, call)[:, : reader.k_len].astype(np.float32)
                layer.scale, layer.softcap = reader.scale, reader.softcap
                layer.allowed = reader.allowed(rows, cols)
                layer.bias = reader.dense(heads, rows, cols)
        layers.append(layer)
    ids, text = store.tokens(step, sample)
    n = layers[0].attn.shape[-1] if layers else 0
    tokens = list(text) if text is not None else [str(i) for i in ids]
    if len(tokens) != n:
        tokens = [tokens[i] if i < len(tokens) else str(i) for i in range(n)]
    return layers, tokens


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch, without importing it
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def _per_layer(values: Any, what: str, expect: int | None = None) -> list[np.ndarray]:
    if isinstance(values, (list, tuple)):
        items = [_numpy(v) for v in values]
        items = [v[0] if v.ndim == 4 and v.shape[0] == 1 else v for v in items]  # BertViz's [1, heads, n, n]
    else:
        a = _numpy(values)
        if a.ndim == 3:
            items = [a]
        elif a.ndim == 4:
            items = list(a)
        else:
            raise ViewError(f"{what} has shape {a.shape}; expected [layers, heads, rows, cols] or [heads, rows, cols]")
    if not items:
        raise ViewError(f"{what} is empty: give at least one layer")
    if expect is not None and len(items) != expect:
        raise ViewError(f"{what} has {len(items)} layers; the attention has {expect}")
    return [np.asarray(v, dtype=np.float32) for v in items]
