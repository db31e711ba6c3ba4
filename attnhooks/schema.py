"""Store schema ``attnhooks/2`` (and ``attnhooks/1``, still read and appended to): the names both the
writer and the reader use.

Layout (identical in every backend; ``S`` stored steps, ``C`` calls per step, ``B`` batch)::

    <root>  attrs: schema, status (writing | complete | recovered), committed, dropped, created,
                   closed, versions, model, options
      steps                 int64 [S]                 user step id of each stored step
      dropped_steps         int64 [n]                 user step ids dropped by when_full="drop"
      tokens/ids            int64 [S, B, L]           fill -1
      tokens/text           str   [S, B, L]           fill ""
      modules/<escaped name>/   attrs: name, kind, heads, kv_heads, head_dim, scale, causal,
                                       dtype, source_dtype, source, layer, info_columns, ...
        calls               int64 [S]                 calls stored at each step (0: not called)
        info                int64 [S, C, len(INFO)]   per call: sizes, offsets, mask flags
        scalars             float64 [S, C, len(SCALARS)]
        rowkeys             int64 [S, C, Lq]          keys each query row attended over
        attn_stored         bool [S, C, Lq]           rows whose attn is stored, when row windows
                                                      (capture(rows=)) left some out; fill True
        q                   [S, C, B, H, Lq, D]
        k                   [S, C, B, Hkv, Lk, D]
        attn                [S, C, B, H, Lq, Lk]      float32 or float16
        lse                 float32 [S, C, B, H, Lq]
        mask/key_valid      bool [S, C, B, Lk]        fill True
        parent              int32 [S, C, B, Lk]       when a KV cache's slots were reordered (beam
                                                      search): the slot preceding each key, fill -1
                                                      (the slot itself); see attnhooks.lineage
        mask/dense          float32 [S, C, B', H', Lq, Lk]   additive, when no compact form
        summary/entropy     float32 [S, C, B, H, Lq]  record="summary" (attnhooks.reduce); also
                            sink [.., Lq], topk_index int32 / topk_weight [.., Lq, K],
                            band [.., Lq, W], received [.., Lk] (column sums),
                            pooled_max / pooled_mean [.., P, P], pooled_bins int64 [S, C, B, 4]

Only positions ``< committed`` of the step axis exist for readers; everything beyond is garbage a
killed writer may have left. Sizes along the other axes are the maximum over steps; the true sizes
of each call are in ``info``. A KV-cache stream (prefill plus decode calls) is one call whose rows
grow; ``rowkeys`` says how many keys each row saw.

**attnhooks/2** stores the same arrays, but a module's small ones (``q``, ``k``, ``lse`` and the
per-call tables, when one chunk of the module's array is at most 1 MiB) are kept in stacks shared
by the modules of the same geometry: ``stacks/q.0 [S, M, C, B, H, Lq, D]`` holds ``modules/<m>/q``
at ``[:, i]``, and the ``stacks`` group's attribute ``attnhooks_stack`` names each stack's members
and their shapes (a copy of it, written first, is the same attribute of the group ``stacks/spare``:
readers take it where the group's does not read, see :data:`attnhooks.backends.stacks.SPARE`).
One chunk of a stack spans the step's data of many modules, so a step of a
32-layer model is a handful of chunk writes, not hundreds. Readers see the per-module arrays
exactly as in ``attnhooks/1`` (:mod:`attnhooks.backends.stacks`); Zarr arrays of new stores keep
their chunk files side by side (keys ``c.3.0.0``) instead of a folder per axis.

A store written under ``torch.distributed`` is a rank set: its root has ``layout="ranks"`` and
``world_size``, and one group ``rank<r>`` per rank holds the layout above (see :mod:`attnhooks.backends.subtree`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnhooks.backends.base import Backend

SCHEMA = "attnhooks/2"
"""Schema of the stores written now: ``attnhooks/1`` with the small per-module arrays stacked
across modules (:mod:`attnhooks.backends.stacks`); readers see the same per-module arrays."""
SUPPORTED = ("attnhooks/1", SCHEMA)

INFO = (
    "batch",  # true batch size of the call
    "q_len",  # query rows stored
    "k_len",  # keys attended by the last row
    "k_stored",  # keys stored in k (from k_offset)
    "q_offset",  # stream position of stored query row 0
    "k_offset",  # position of stored key 0
    "causal",  # 1 when causal
    "mask_offset",  # causal/window alignment: row i sees keys j <= i + mask_offset
    "window",  # sliding window, -1 for none
    "has_key_valid",  # 1 when mask/key_valid holds padding
    "dense_batch",  # mask/dense sizes; 0 when the mask is compact
    "dense_heads",
)
SCALARS = ("scale", "dropout", "softcap")  # softcap 0: none
TENSORS = ("q", "k", "attn", "lse")
# record="summary" leaves, under modules/<name>/summary/ (see attnhooks.reduce)
SUMMARY = (
    "entropy",
    "topk_index",
    "topk_weight",
    "received",
    "sink",
    "band",
    "pooled_max",
    "pooled_mean",
    "pooled_bins",
)
ROWWISE = ("entropy", "topk_index", "topk_weight", "sink", "band")  # [S, C, B, H, Lq, ...]: per query row

STATUS_WRITING, STATUS_COMPLETE, STATUS_RECOVERED = "writing", "complete", "recovered"


def escape(name: str) -> str:
    """A module name as one path segment: ``%``, ``/`` and ``.`` percent-encoded; the root
    module (``""``) becomes ``%root``."""
    if name == "":
        return "%root"
    return name.replace("%", "%25").replace("/", "%2F").replace(".", "%2E")


def unescape(segment: str) -> str:
    if segment == "%root":
        return ""
    return segment.replace("%2E", ".").replace("%2F", "/").replace("%25", "%")


def module_path(name: str, leaf: str = "") -> str:
    path = f"modules/{escape(name)}"
    return f"{path}/{leaf}" if leaf else path


def step_arrays(backend: Backend) -> list[str]:
    """Every array whose first axis is the step axis."""
    paths = [p for p in ("steps", "tokens/ids", "tokens/text") if backend.contains(p)]
    if backend.contains("modules"):
        for segment in backend.children("modules"):
            paths.extend(_arrays_under(backend, f"modules/{segment}"))
    return paths


def _arrays_under(backend: Backend, group: str) -> list[str]:
    out = []
    for child in backend.children(group):
        path = f"{group}/{child}"
        if backend.children(path):
            out.extend(_arrays_under(backend, path))
        else:
            out.append(path)
    return out


def trim(backend: Backend, committed: int) -> list[str]:
    """Cut every step-axis array to ``committed`` steps; return the arrays that were longer."""
    trimmed = []
    for path in step_arrays(backend):
        shape = backend.shape(path)
        if shape and shape[0] != committed:
            backend.resize(path, (committed, *shape[1:]))
            trimmed.append(path)
    return trimmed
