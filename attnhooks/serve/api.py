"""The JSON API of ``attnhooks serve``, apart from any web framework: query parameters in, JSON-ready
dicts out, :class:`ApiError` (an HTTP status and a message) for anything the client got wrong.

Endpoints (all ``GET``, all read-only; ``module``, ``step``, ``sample``, ``call``, ``rank`` select a
call as in :meth:`attnhooks.Store.attention`; ``step`` defaults to the first stored step):

- ``/api/store``: modules (heads, head_dim, kind), steps, ranks, status.
- ``/api/call?module=M&step=S&sample=B``: ``q_len``, ``k_len``, heads, what is stored, token strings.
- ``/api/attention?module=M&step=S&sample=B&head=H&rows=A:B&cols=C:D``: ``{"rows": [A, B],
  "cols": [C, D], "values": [[...], ...]}``, the exact float32 probabilities of that window (equal to
  ``Store.attention(M, S, B, heads=H, rows=slice(A, B), cols=slice(C, D))``), at most
  :data:`MAX_CELLS` cells.
- ``/api/overview?...&head=H&size=P``: the head pooled (max) to at most ``P x P`` cells: the stored
  summary's pooled map when the store has one, else pooled while reading (one row tile at a time;
  remembered). ``null`` marks cells no row may attend.
- ``/api/summary?...&head=H&points=N``: attention received per key, row entropy and sink mass, from
  the stored summary, averaged down to at most ``N`` points.
- ``/api/row?...&head=H&row=I&top=K``: one query row: its ``K`` strongest keys in every head, and for
  head ``H`` the scores ``q·k · scale`` when q and k are stored.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from attnhooks.errors import AttnHooksError
from attnhooks.read.store import Store

__all__ = ["MAX_CELLS", "Api", "ApiError"]

MAX_CELLS = 1 << 20  # cells of one /api/attention window (a whole 32k-key row fits; 1024 x 1024 does)
MAX_OVERVIEW = 1024
SINK_KEYS = 4


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx) and a message that says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Api:
    """The endpoints over one open store. Reads are serialised by a lock (backends are read from
    one thread at a time); each returns only the window asked for, never a whole head."""

    def __init__(self, store: Store, *, max_cells: int = MAX_CELLS) -> None:
        self.store = store
        self.max_cells = max_cells
        self._lock = threading.Lock()
        self._overviews: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self.routes: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
            "store": self.catalog,
            "call": self.call,
            "attention": self.attention,
            "overview": self.overview,
            "summary": self.summary,
            "row": self.row,
        }

    def handle(self, name: str, params: Mapping[str, str], *, binary: bool = False) -> tuple[int, dict[str, Any]]:
        """``(status, body)`` of endpoint ``name``; errors become ``{"error": message}`` with a 4xx status.
        ``binary`` (``attention`` only): the body holds the window as ``"array"`` (float32) instead of lists."""
        route = self.routes.get(name)
        if route is None:
            return 404, {"error": f"no endpoint /api/{name}; the endpoints are /api/{', /api/'.join(self.routes)}"}
        try:
            with self._lock:
                if binary and name == "attention":
                    rows, cols, values = self.window(params)
                    return 200, {"rows": list(rows), "cols": list(cols), "array": values}
                return 200, route(params)
        except ApiError as err:
            return err.status, {"error": err.message}
        except (LookupError, AttnHooksError) as err:
            status = 404 if isinstance(err, LookupError) and not isinstance(err, IndexError) else 400
            return status, {"error": " ".join(str(err).split()) or type(err).__name__}
        except ValueError as err:
            return 400, {"error": " ".join(str(err).split())}

    # -- endpoints --------------------------------------------------------------------------------
    def catalog(self, params: Mapping[str, str]) -> dict[str, Any]:
        st = self.store
        modules = []
        for name in st.modules:
            info = st.module_info(name)
            modules.append({k: _plain(info.get(k)) for k in ("kind", "heads", "kv_heads", "head_dim", "layer")})
            modules[-1]["name"] = name
        return {
            "location": str(st.location),
            "status": st.status,
            "steps": st.steps,
            "ranks": st.ranks,
            "modules": modules,
        }

    def call(self, params: Mapping[str, str]) -> dict[str, Any]:
        st, where = self._where(params)
        reader = st.call_reader(*where)
        ids, text = st.tokens(where[1], where[2])
        tokens = list(text) if text is not None else [str(i) for i in ids]
        has = {leaf: reader.has(leaf) for leaf in ("attn", "q", "k", "lse", "summary")}
        return {
            "module": where[0],
            "step": st.steps[st.catalog.position(where[1])],
            "sample": where[2],
            "call": where[3],
            "q_len": reader.q_len,
            "k_len": reader.k_len,
            "heads": reader.layout.heads,
            "q_start": reader.query_start() if reader.q_len != reader.k_len else 0,
            "has": has,
            "tokens": tokens[: reader.k_len],
        }

    def attention(self, params: Mapping[str, str]) -> dict[str, Any]:
        rows, cols, values = self.window(params)
        return {"rows": list(rows), "cols": list(cols), "values": values.tolist()}

    def window(self, params: Mapping[str, str]) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
        """The checked window of ``/api/attention``: ``(rows, cols, probabilities [r, c] float32)``."""
        st, where = self._where(params)
        reader = st.call_reader(*where)
        head = _int(params, "head", 0, low=0, high=reader.layout.heads - 1)
        rows = _range(params, "rows", reader.q_len)
        cols = _range(params, "cols", reader.k_len)
        cells = (rows[1] - rows[0]) * (cols[1] - cols[0])
        if cells > self.max_cells:
            raise ApiError(
                413,
                f"rows={rows[0]}:{rows[1]} x cols={cols[0]}:{cols[1]} is {cells} cells, more than the limit of "
                f"{self.max_cells}: ask for a smaller window (e.g. 256 x 256 tiles), or /api/overview",
            )
        values = st.attention(*where, heads=head, rows=slice(*rows), cols=slice(*cols), method=_method(params))
        return rows, cols, values

    def overview(self, params: Mapping[str, str]) -> dict[str, Any]:
        st, where = self._where(params)
        reader = st.call_reader(*where)
        head = _int(params, "head", 0, low=0, high=reader.layout.heads - 1)
        size = _int(params, "size", 256, low=1, high=MAX_OVERVIEW)
        key = (*where, st.default_rank, head, size, _method(params))
        if key in self._overviews:
            self._overviews.move_to_end(key)
            return self._overviews[key]
        if reader.has("summary"):
            summary = st.summary(*where)
            pooled, bins = summary["pooled_max"][head], [int(b) for b in summary["pooled_bins"][:2]]
            source = "summary"
        else:
            from attnhooks.viewer.stored import pooled_attention

            values, visible, block = pooled_attention(st, *where, heads=head, size=size, method=_method(params))
            pooled, bins, source = np.where(visible, values[0], np.nan), list(block), "pooled while read"
        out = {
            "source": source,
            "bins": bins,
            "shape": list(pooled.shape),
            "q_len": reader.q_len,
            "k_len": reader.k_len,
            "values": _nulls(pooled),
        }
        self._overviews[key] = out
        while len(self._overviews) > 32:
            self._overviews.popitem(last=False)
        return out

    def summary(self, params: Mapping[str, str]) -> dict[str, Any]:
        st, where = self._where(params)
        reader = st.call_reader(*where)
        head = _int(params, "head", 0, low=0, high=reader.layout.heads - 1)
        points = _int(params, "points", 512, low=1, high=8192)
        if not reader.has("summary"):
            return {
                "available": False,
                "why": "the store has no summary for this module: capture with "
                "record=(..., 'summary') for attention received per key, row entropy and sinks",
            }
        s = st.summary(*where)
        out: dict[str, Any] = {"available": True}
        for name, axis in (("received", "keys"), ("entropy", "rows"), ("sink", "rows")):
            if name in s:
                values, per = _mean_bins(np.asarray(s[name][head], dtype=np.float64), points)
                out[name] = {"axis": axis, "per_point": per, "values": _nulls(values)}
        return out

    def row(self, params: Mapping[str, str]) -> dict[str, Any]:
        st, where = self._where(params)
        reader = st.call_reader(*where)
        head = _int(params, "head", 0, low=0, high=reader.layout.heads - 1)
        row = _int(params, "row", None, low=0, high=reader.q_len - 1)
        top = _int(params, "top", 12, low=1, high=256)
        probs = st.attention(*where, rows=row, method=_method(params))  # [heads, k_len]: one row only
        heads = []
        for h in range(probs.shape[0]):
            order = np.argsort(-probs[h], kind="stable")[:top]
            heads.append({"keys": order.tolist(), "weights": probs[h, order].tolist()})
        out: dict[str, Any] = {"row": row, "heads": heads}
        if reader.has("q") and reader.has("k") and reader.parent is None:
            keys = np.asarray(heads[head]["keys"], dtype=np.int64)
            index = np.array([head])
            scores = reader.scores(index, slice(row, row + 1), slice(0, reader.k_len))[0, 0, keys]  # one row: [k_len]
            out["qk"] = {
                "head": head,
                "keys": keys.tolist(),
                "scores": _nulls(scores),
                "q": reader.queries(index, slice(row, row + 1))[0, 0].tolist(),
                "scale": reader.scale,
            }
        return out

    # -- parameters -------------------------------------------------------------------------------
    def _where(self, params: Mapping[str, str]) -> tuple[Store, tuple[str, int | None, int, int]]:
        st = self.store
        rank = params.get("rank")
        if rank is not None:
            st = st.rank(_int(params, "rank", 0))
        module = params.get("module")
        if not module:
            raise ApiError(400, f"module= is missing: give one of {st.modules[:6]}")
        if module not in st.modules:
            raise ApiError(
                404,
                f"module={module!r} is not in the store; its modules are {st.modules[:6]}"
                + (f" (and {len(st.modules) - 6} more)" if len(st.modules) > 6 else ""),
            )
        step = _int(params, "step", None)
        if step is not None and not st.has_step(step):
            raise ApiError(404, f"step={step} is not a committed step; the steps are {st.steps[:10]}")
        return st, (module, step, _int(params, "sample", 0, low=0), _int(params, "call", 0, low=0))


def _int(
    params: Mapping[str, str], name: str, default: int | None, *, low: int | None = None, high: int | None = None
) -> Any:
    text = params.get(name)
    if text is None or text == "":
        if default is None and name in ("row",):
            raise ApiError(400, f"{name}= is missing: give an integer")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name}={text!r} is not an integer") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(
            400,
            f"{name}={value} is out of range: use {low} to {high}"
            if high is not None
            else f"{name}={value} is out of range: use at least {low}",
        )
    return value


def _range(params: Mapping[str, str], name: str, size: int) -> tuple[int, int]:
    """``A:B`` (either end may be left out) inside ``[0, size]``, A < B."""
    text = params.get(name)
    if text is None:
        return 0, size
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else size
    except ValueError:
        raise ApiError(400, f"{name}={text!r} is not a range START:STOP such as 0:256") from None
    if not 0 <= start < stop <= size:
        raise ApiError(
            400, f"{name}={text} is out of range: the call has {size} {name}; use 0 <= START < STOP <= {size}"
        )
    return start, stop


def _method(params: Mapping[str, str]) -> str:
    method = params.get("method", "auto")
    if method not in ("auto", "stored", "reconstructed"):
        raise ApiError(400, f"method={method!r}: use auto, stored or reconstructed")
    return method


def _mean_bins(values: np.ndarray, points: int) -> tuple[np.ndarray, int]:
    per = max(1, math.ceil(values.size / points))
    pad = np.full(math.ceil(values.size / per) * per, np.nan)
    pad[: values.size] = values
    with np.errstate(all="ignore"):
        return np.nanmean(pad.reshape(-1, per), axis=1), per


def _nulls(values: np.ndarray) -> Any:
    """Floats as a nested list, NaN and infinities as None (JSON has no NaN)."""
    a = np.asarray(values, dtype=np.float64)
    obj = a.astype(object)
    obj[~np.isfinite(a)] = None
    return obj.tolist()


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
