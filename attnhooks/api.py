"""The public entry point that joins the layers: :func:`capture` checks the options, then hands the
capture side (:class:`~attnhooks.capturing.session.Capture`) the opener of the write side, so
neither imports the other's internals."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from attnhooks.backends.base import Codec
from attnhooks.capturing.options import DEFAULT_RECORD, capture_options
from attnhooks.capturing.select import Modules
from attnhooks.capturing.session import Capture
from attnhooks.errors import ModuleSelectionError, RecordOptionError, StoreOptionError
from attnhooks.reduce.summary import SummaryOptions
from attnhooks.write.open import Location, opener, store_options

__all__ = ["capture"]


def capture(
    model: nn.Module,
    *,
    modules: Modules = None,
    record: Iterable[str] = DEFAULT_RECORD,
    every: int = 1,
    verify: bool | int = False,
    dropout: str = "flag",
    store: Location | None = None,
    mode: str = "create",
    buffer: int | str = "1GiB",
    when_full: str = "block",
    dtype: str | None = None,
    compression: str | Codec | None = None,
    keep: bool | None = None,
    tokenizer: Any = None,
    summary: SummaryOptions | dict[str, int] | None = None,
    progress: bool = False,
    rows: slice | Iterable[slice] | None = None,
    distributed: bool | None = None,
    ranks: Iterable[int] | None = None,
) -> Capture:
    """Capture the attention of ``model`` while it runs, on its own attention path.

    Args:
        model: any ``nn.Module``; DDP / DataParallel / PEFT / ``torch.compile`` wrappers are looked
            through for names.
        modules: which modules own attention calls: None (every attention call of the model,
            attributed to the innermost running module), a glob such as
            ``"model.layers.*.self_attn"``, a list of names or globs, or a predicate
            ``(name, module) -> bool``.
        record: what to keep per call, drawn from ``"attn"`` (``[batch, heads, q_len, k_len]``
            float32 probabilities), ``"q"``, ``"k"``, ``"lse"`` (row log-sum-exp: with q and k,
            any tile can be rebuilt exactly offline) and ``"summary"`` (reductions computed block
            by block where the model runs, never an n x n matrix: row entropy, top-k keys,
            attention received per key, sink mass, the last diagonals, a pooled overview; see
            :mod:`attnhooks.reduce`).
        every: capture one step in ``every`` (steps ``0, every, 2*every, ...``); other steps run
            with no interception at all.
        verify: opt-in faithfulness check: ``True`` (4 rows) or a number of query rows per call
            whose ``attn @ v`` is compared with the kernel's output; ``Record.verify_error`` holds
            the difference and a :class:`FaithfulnessWarning` reports a mismatch.
        dropout: ``"flag"`` records pre-dropout probabilities with ``Record.dropout`` set and
            warns once; ``"refuse"`` raises :class:`DropoutError` when attention dropout is active.
        store: stream the records to a store while the model runs: a path ending in ``.zarr``,
            ``.h5`` / ``.hdf5``, a ``memory://name`` URL, or an open backend. Read it back with
            :func:`attnhooks.open_store`. A step becomes visible to readers only once all of it is
            written; leaving the ``with`` block flushes, marks the store complete and raises any
            error of the writer thread.
        mode: ``"create"`` (fail if the store exists), ``"overwrite"`` or ``"append"`` (add steps
            after the committed ones; the modules must match; step ids continue from the last).
        buffer: memory budget for records staged but not yet written (bytes or ``"512MiB"``).
        when_full: what a hook does when the budget is spent: ``"block"`` until the writer
            catches up, or ``"drop"`` the rest of the step (counted in the store's ``dropped``).
        dtype: storage dtype of q and k: None keeps the model's (bfloat16 becomes float32,
            losslessly), ``"float32"``, ``"float16"`` (also attn), or ``"bfloat16-bits"`` (raw
            bfloat16 bits as uint16, converted back by the reader).
        compression: ``"zstd"``, ``"gzip"``, ``"lzf"`` (HDF5), ``"none"``, a
            :class:`~attnhooks.backends.Codec`, or None for the backend's default (zstd level 1;
            in HDF5 through ``hdf5plugin``, which other HDF5 readers then need; ``"gzip"`` is
            readable by every HDF5 tool but about 10x slower to write).
        keep: also keep the records in ``cap.records`` (default: only without a store).
        tokenizer: with a store, token strings are stored next to the ids through
            ``tokenizer.convert_ids_to_tokens``.
        summary: sizes of the ``"summary"`` reductions: a :class:`~attnhooks.reduce.SummaryOptions`
            or a dict of its fields (``topk``, ``sinks``, ``band``, ``pooled``, ``block``).
        progress: show a progress bar (tqdm, ``attnhooks[progress]``) of the attention calls
            captured, with the step, the module and what the store has written so far: for long
            prefills and generations.
        rows: row windows: keep ``attn`` only for these query rows, a slice or a list of slices in
            stream positions (a generation's decode rows continue its prompt's), negative bounds
            counting from the end of each forward call: ``slice(-512, None)`` keeps the last 512
            rows of a prefill (and every decode row). Other rows stay exactly rebuildable from q,
            k and lse (``Store.attention`` mixes both). Needs ``"attn"`` in ``record``.
        distributed: under ``torch.distributed`` (DDP, FSDP, ``torchrun``), every rank writes its
            own group of one store, with its rank and the world size in the metadata
            (:mod:`attnhooks.backends.subtree`; read them with ``Store.ranks`` and ``rank=``). None: whenever
            the process group is initialised; True: require it; False: a plain store per process
            (give each rank its own path). No collective operation is ever made: ranks never wait
            for one another. Zarr stores only (HDF5 files take one writer).
        ranks: the ranks that capture (e.g. ``[0]``); on the others the capture installs nothing
            and the model runs untouched. Default: every rank.

    Returns:
        A :class:`Capture`; use it as a context manager.

    Example:
        >>> import torch, attnhooks
        >>> layer = torch.nn.TransformerEncoderLayer(16, 4, batch_first=True).eval()
        >>> with attnhooks.capture(layer) as cap:
        ...     _ = layer(torch.randn(2, 5, 16))
        >>> rec = cap.records[0]
        >>> rec.module, tuple(rec.attn.shape)
        ('self_attn', (2, 4, 5, 5))
    """
    _refuse_what_would_be_ignored(modules, tokenizer, rows)
    if store is None:
        for name, value in (
            ("mode", mode),
            ("buffer", buffer),
            ("when_full", when_full),
            ("dtype", dtype),
            ("compression", compression),
        ):
            if value != _STORE_DEFAULTS[name]:
                raise StoreOptionError(
                    f"{name}={value!r} is an option of a store, and no store= was given: pass store='run.zarr' "
                    f"(or .h5) to stream the capture to one, or drop {name}= (records stay in cap.records)"
                )
    options = capture_options(
        modules=modules,
        record=record,
        every=every,
        verify=verify,
        dropout=dropout,
        keep=store is None if keep is None else bool(keep),
        tokenizer=tokenizer,
        summary=summary,
        progress=progress,
        rows=rows,
        distributed=distributed,
        ranks=ranks,
    )
    if store is None:
        return Capture(model, options)
    checked = store_options(mode, buffer, when_full, dtype, compression)  # before anything is created
    described = {
        **options.described,
        "mode": mode,
        "buffer": buffer,
        "when_full": when_full,
        "dtype": dtype,
        "compression": compression if isinstance(compression, (str, type(None))) else repr(compression),
    }
    return Capture(model, options, opener(store, checked, described))


_STORE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(capture).parameters.items()
    if name in ("mode", "buffer", "when_full", "dtype", "compression")
}
"""The store options' defaults, read from :func:`capture`'s signature (without ``store=``, others are refused)."""


def _refuse_what_would_be_ignored(modules: Any, tokenizer: Any, rows: Any) -> None:
    """Options that would otherwise be taken without effect (issue 18: refuse them with a reason)."""
    if modules is not None and not (isinstance(modules, (str, Iterable)) or callable(modules)):
        raise ModuleSelectionError(
            f"modules={modules!r}: give a module name or glob ('model.layers.*.self_attn'), a list of them, "
            "a predicate (name, module) -> bool, or None for every attention call"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        raise RecordOptionError(
            f"tokenizer={tokenizer!r} is a name, not a tokenizer: pass the object, "
            f"transformers.AutoTokenizer.from_pretrained({os.fspath(tokenizer)!r})"
        )
    for window in [rows] if isinstance(rows, slice) else []:
        start, stop = window.start, window.stop
        if start is not None and stop is not None and (start < 0) == (stop < 0) and stop <= start:
            raise RecordOptionError(
                f"rows={window} selects no row (stop <= start): give slice(start, stop) with start < stop, "
                "negative bounds counting from the end of each call"
            )
