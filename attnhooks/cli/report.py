"""Plain-data reports of a store for people and scripts: what it holds, and its per-head metrics.

Used by ``attnhooks info`` and ``attnhooks analyze``; everything returned is JSON-serialisable.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnhooks.errors import AnalysisError
from attnhooks.read.store import Store

__all__ = ["describe", "head_rows", "store_info", "top_heads", "write_rows"]

CLASSIFY_LIMIT = 1024  # heads are classified (vertical / diagonal / ...) when a sequence is at most this long


def store_info(st: Store) -> dict[str, Any]:
    """What ``st`` holds: status, steps, modules with their shapes and leaves, tokens, size on disk."""
    meta = st.metadata
    options = meta.get("options")
    info: dict[str, Any] = {
        "location": str(st.location),
        "schema": st.schema,
        "status": st.status,
        "steps": st.steps,
        "dropped_steps": st.dropped_steps,
        "created": meta.get("created"),
        "model": meta.get("model"),
        "versions": meta.get("versions"),
        "options": json.loads(options) if isinstance(options, str) else options,
        "bytes": _size(st.location),
        "modules": [_module(st, m) for m in st.modules],
    }
    if st.rank_set:
        info["world_size"] = st.world_size
        ranks = [st.rank(r) for r in st.ranks]
        info["ranks"] = [{"rank": r.default_rank, "status": r.status, "steps": len(r.steps)} for r in ranks]
    ids, text = st.tokens()
    if ids:
        info["tokens"] = {"count": len(ids), "first": (text or [str(i) for i in ids])[:32]}
    return info


def _module(st: Store, name: str) -> dict[str, Any]:
    attrs = st.module_info(name)
    out: dict[str, Any] = {"name": name}
    out.update(
        {
            k: attrs.get(k)
            for k in ("kind", "layer", "heads", "kv_heads", "head_dim", "causal", "window", "dtype", "source")
        }
    )
    if st.steps:
        calls = st.calls(name)
        out["calls"] = calls
        if calls:
            call = st.info(name)
            out["q_len"], out["k_len"] = call["q_len"], call["k_len"]
            out["recorded"] = sorted(st.call_reader(name).layout.leaves & {"attn", "q", "k", "lse", "summary"})
    return out


def describe(info: dict[str, Any]) -> str:
    """:func:`store_info` as a few lines of text."""
    steps = info["steps"]
    shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
    lines = [
        f"{info['location']}  ({info['schema']}, {info['status']}, {_human(info['bytes'])})",
        f"model:   {info.get('model') or '?'}",
    ]
    if "ranks" in info:
        ranks = ", ".join(f"{r['rank']} ({r['status']}, {r['steps']} steps)" for r in info["ranks"])
        first = info["ranks"][0]["rank"]
        lines.append(f"ranks:   {len(info['ranks'])} of {info['world_size']}: {ranks}; shown below: rank {first}")
    lines.append(
        f"steps:   {len(steps)} [{shown}]" + (f"; dropped {info['dropped_steps']}" if info["dropped_steps"] else "")
    )
    if "tokens" in info:
        tokens = info["tokens"]
        lines.append(
            f"tokens:  {tokens['count']} in sample 0: {' '.join(map(str, tokens['first']))}"
            + (" ..." if tokens["count"] > 32 else "")
        )
    lines.append(f"modules: {len(info['modules'])}")
    for m in info["modules"]:
        shape = f"q {m.get('q_len', '?')} x k {m.get('k_len', '?')}"
        heads = f"{m['heads']} heads" + (
            f" / {m['kv_heads']} kv" if m.get("kv_heads") not in (None, m["heads"]) else ""
        )
        flags = "causal" if m.get("causal") else ""
        lines.append(
            f"  {m['name']}  [{m.get('kind')}, {heads}, d={m.get('head_dim')}, {shape}, {m.get('calls', 0)} call(s)"
            f"{', ' + flags if flags else ''}] {','.join(m.get('recorded', []))}"
        )
    return "\n".join(lines)


def head_rows(
    st: Store,
    step: int | None = None,
    sample: int = 0,
    *,
    call: int = 0,
    modules: Sequence[str] | None = None,
    method: str = "auto",
) -> list[dict[str, Any]]:
    """One dict per (module, head) with the means of :func:`attnhooks.analysis.head_table`'s metrics,
    plus ``class`` (vertical / diagonal / block / heterogeneous) when the sequence is short enough."""
    from attnhooks.analysis import classify_heads, head_table, special_tokens

    names = st.select(modules)
    table = head_table(st, step, sample, modules=names, call=call, method=method)
    rows = table.rows()
    reader = st.call_reader(names[0], step, sample, call)
    sizes = [st.info(m, step, call) for m in names]
    square = all(info["q_len"] == info["k_len"] for info in sizes)
    if square and reader.q_len <= CLASSIFY_LIMIT:
        _, tokens = st.tokens(step, sample)
        special = special_tokens(tokens) if tokens and len(tokens) == reader.k_len else None
        attn = np.stack([st.attention(m, step, sample, call, method=method) for m in names])
        for row, label in zip(rows, classify_heads(attn, special=special).reshape(-1)):
            row["class"] = str(label)
    return rows


def top_heads(rows: Sequence[dict[str, Any]], n: int = 3) -> str:
    """The ``n`` highest heads of each metric, as text (``L2H7``: layer 2 of the rows' modules, head 7)."""
    metrics = [k for k in rows[0] if k not in ("module", "layer", "head", "class")] if rows else []
    modules = list(dict.fromkeys(r["module"] for r in rows))
    lines = [
        f"{len(rows)} heads of {len(modules)} modules (L0 = {modules[0] if modules else '-'}, ...); "
        f"top {n} per metric, mean over query rows"
    ]
    for metric in metrics:
        best = sorted(rows, key=lambda r: -r[metric] if np.isfinite(r[metric]) else np.inf)[:n]
        lines.append(f"  {metric:<20} " + "   ".join(f"L{r['layer']}H{r['head']}={r[metric]:.3f}" for r in best))
    if rows and "class" in rows[0]:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["class"]] = counts.get(r["class"], 0) + 1
        lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write :func:`head_rows` to ``path``: CSV for ``.csv``, JSON (a list of objects) for ``.json``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise AnalysisError(f"{path}: the file must end in .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(json.dumps(list(rows), indent=1))
        return path
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["module", "layer", "head"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _size(location: str) -> int | None:
    path = Path(os.fspath(location))
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _human(size: int | None) -> str:
    if size is None:
        return "in memory"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
