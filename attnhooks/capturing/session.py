"""capture(): watch a model's attention calls while it runs, with nothing left behind afterwards.

Lifecycle: hooks, the registry patch and the ``generate`` scope are installed on ``__enter__``
into an ``ExitStack`` and removed in ``__exit__`` (also after a partial install or an exception
in the forward). The torch-function mode and the MHA fast-path switch are active only while a
captured step's forward runs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from attnhooks.capturing.distributed import RankInfo, current
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.intercept.hf import RegistryPatch
from attnhooks.capturing.intercept.mode import AttentionMode
from attnhooks.capturing.kvcache import CacheWatch, Past, find_cache, past_length
from attnhooks.capturing.options import CaptureOptions
from attnhooks.capturing.record import Record
from attnhooks.capturing.recorder import Recorder
from attnhooks.capturing.select import named_modules, select, unwrap
from attnhooks.capturing.sink import StepSink, StoreOpener
from attnhooks.capturing.streams import assemble
from attnhooks.errors import (
    AttnHooksWarning,
    CacheMismatchError,
    CaptureStateError,
    RecordOptionError,
)

__all__ = ["Capture"]

_HEAD_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_head", "n_heads")


class Capture:
    """A running capture; use :func:`capture` to make one. See :func:`capture` for the options.

    Attributes:
        records: every :class:`Record` kept, in call order (empty when streaming to a store
            unless ``keep=True``).
        every: capture one step in ``every``.
        writer: the :class:`~attnhooks.writer.StoreWriter` while streaming to a store, else None.
        rank: this process's :class:`~attnhooks.capturing.distributed.RankInfo` while it writes its group of a
            rank set (under ``torch.distributed``), else None.
    """

    def __init__(self, model: nn.Module, options: CaptureOptions, open_store: StoreOpener | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise RecordOptionError(f"capture() takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.options = options
        self._chain = unwrap(model)
        self._selection = select(self._chain[-1], options.modules)
        self._modules_by_name = named_modules(self._chain[-1])
        self.every = options.every
        self._recorder = Recorder(options.record)
        self._progress = _progress_bar if options.progress else None
        self._bar: Any = None
        self._recorder.keep = options.keep
        self._open_store_with = open_store
        self.rank: RankInfo | None = None
        self._process: RankInfo | None = None
        tokenizer = options.tokenizer
        self.tokenizer = tokenizer
        self.writer: StepSink | None = None
        self._mode = AttentionMode(self)
        self._registry = RegistryPatch(self, lambda: self._recorder.events, self._mode)
        self._exit: ExitStack | None = None
        self._stack: list[str] = []
        self._fwd_depth = 0
        self._gen_depth = 0
        self._capturing = False
        self._step_used = False
        self._manual = False
        self._fastpath: bool | None = None
        self._checked_silent = False
        self._watch = CacheWatch(on_crop=self._cropped)
        self._continuing: Past | None = None

    # -- public API -------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        return self._recorder.records

    @property
    def step(self) -> int:
        """The step counter. Assign it (``cap.step = i`` in a training loop) to take control: from
        then on it changes only when you assign it, and every forward until then is part of step i."""
        return self._recorder.step

    @step.setter
    def step(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise RecordOptionError(f"cap.step must be a non-negative int, got {value!r}")
        self._manual = True
        self._step_used = False
        self._recorder.step = value

    @property
    def active(self) -> bool:
        """True inside the ``with`` block."""
        return self._exit is not None

    def assemble(self, module: str, step: int | None = None, call: int = 0) -> Record:
        """One record for a whole call stream: prefill plus every KV-cache continuation.

        See :func:`attnhooks.streams.assemble`; ``step`` defaults to the last captured step.
        """
        if step is None:
            steps = [r.step for r in self.records if r.module == module]
            step = steps[-1] if steps else self.step
        return assemble(self.records, module, step, call)

    @contextlib.contextmanager
    def continuing(self, past: int | None = None) -> Iterator[None]:
        """Top-level forwards inside this block continue the current step's KV-cache streams.

        For models whose cache attnhooks cannot see (a hand-written cache kept in the model, as
        gpt-fast or a ``torch.nn`` decoder do): say that a forward continues the step, as a
        Hugging Face cache argument says it by itself. Each forward's self-attention calls then
        add their query rows and their new keys to the calls they continue.

        Args:
            past: positions the model's cache holds before the first forward of the block (when a
                cache was cropped, the rows from ``past`` on are replaced); None: the cache holds
                what was recorded so far. The keys the kernel receives are checked against the
                recorded ones either way: :class:`CacheMismatchError` when they differ.

        Example:
            >>> with attnhooks.capture(model, record=("q", "k")) as cap:   # doctest: +SKIP
            ...     logits = model(prompt)               # step 0: the prefill
            ...     for _ in range(8):
            ...         with cap.continuing():
            ...             logits = model(next_token)   # one query row, one new key per call
        """
        if past is not None and (not isinstance(past, int) or isinstance(past, bool) or past < 0):
            raise RecordOptionError(f"continuing(past={past!r}): give the cache's length, a non-negative int")
        outer, self._continuing = self._continuing, Past(length=past)
        try:
            yield
        finally:
            self._continuing = outer

    def set_tokens(self, ids: Any, text: list[list[str]] | None = None) -> None:
        """Tokens of the current step for the store: ``ids`` ``[batch, len]`` (tensor, array or
        lists), ``text`` the matching token strings. Top-level forwards given ``input_ids`` and
        ``generate`` record their ids (and strings, with ``tokenizer=``) without this call."""
        if self.writer is None:
            raise CaptureStateError("set_tokens() needs a capture streaming to a store (capture(..., store=...))")
        ids_np = _as_ids(ids)
        if ids_np is None:
            raise RecordOptionError(f"set_tokens(ids=...): expected integer ids [batch, len], got {type(ids).__name__}")
        self.writer.tokens(ids_np, text if text is not None else self._token_text(ids_np))

    def flush(self) -> None:
        """With a store: wait until every step so far is written and committed (readers see it)."""
        if self.writer is not None:
            self.writer.flush()

    def clear(self) -> None:
        """Forget the records kept so far (hooks stay installed)."""
        self._recorder.records.clear()

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._exit is not None:
            raise CaptureStateError("this capture is already active; create a new one with attnhooks.capture(model)")
        stack = ExitStack()
        try:
            self._install(stack)
        except BaseException:
            stack.close()
            raise
        self._exit = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._exit = self._exit, None
        try:
            self._close_unit(failed=exc[0] is not None)
        finally:
            if stack is not None:
                stack.close()
            self._fwd_depth = self._gen_depth = 0
            self._stack.clear()

    def _install(self, stack: ExitStack) -> None:
        process = current(require=self.options.distributed is True)
        self.rank = None if self.options.distributed is False else process  # a rank set is written when set
        if self.options.ranks is not None and (process.rank if process else 0) not in self.options.ranks:
            return  # not a capturing rank: nothing is installed, the model runs untouched
        self._process = process
        if self._progress is not None:
            self._bar = self._progress()
            stack.callback(self._bar.close)
        if self._open_store_with is not None:
            self._open_store(stack)
        for root in self._chain:
            stack.callback(root.register_forward_pre_hook(self._root_pre, with_kwargs=True).remove)
            # prepend: when captures nest on one model, the last one opened closes first (LIFO)
            post = root.register_forward_hook(self._root_post, prepend=True, always_call=True)
            stack.callback(post.remove)
        for name, module in self._modules_by_name.items():
            if self._selection.names.get(id(module)) != name:
                continue
            if self._selection.everything and name and not _may_own_attention(module):
                continue  # torch's own leaf layers (Linear, norms, dropout...) never compute attention
            stack.callback(module.register_forward_pre_hook(self._push).remove)
            stack.callback(module.register_forward_hook(self._pop, always_call=True).remove)
        self._registry.install()
        stack.callback(self._registry.remove)
        stack.callback(self._watch.close)
        for obj in self._chain:
            _patch_generate(stack, obj, self._generate_scope)

    def _open_store(self, stack: ExitStack) -> None:
        assert self._open_store_with is not None
        meta: dict[str, Any] = {"model": f"{type(self._chain[-1]).__module__}.{type(self._chain[-1]).__qualname__}"}
        if self._process is not None:
            meta.update(rank=self._process.rank, world_size=self._process.world_size)
        writer = self._open_store_with(meta, self.rank)
        self.writer = writer
        stack.callback(self._close_store)  # first in, last out: hooks are gone before the final flush
        rec = self._recorder
        rec.listener, rec.admit = writer, writer.admit
        if writer.last_step is not None and not self._manual:
            rec.step = writer.last_step + 1

    def _close_store(self) -> None:
        writer, self.writer = self.writer, None
        self._recorder.listener = self._recorder.admit = None
        if writer is not None:
            writer.close()

    # -- hooks ----------------------------------------------------------------------------------
    def _push(self, module: nn.Module, args: Any) -> None:
        if self._capturing:
            self._stack.append(self._selection.names[id(module)])

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing and self._stack:
            self._stack.pop()

    def _root_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._fwd_depth += 1
        if self._fwd_depth > 1:
            return
        past = self._past(args, kwargs)
        continuation = past is not None and (past.length is None or past.length > 0)
        if self._gen_depth == 0:
            self._open_unit(new_step=not continuation)
            if not continuation:
                self._auto_tokens(args, kwargs)
        self._recorder.begin_pass(continuation, past)
        self._mode.forget()

    def _cropped(self, length: int) -> None:
        if self._capturing:
            self._recorder.crop(length)

    def _past(self, args: Any, kwargs: dict[str, Any]) -> Past | None:
        """What a top-level forward's KV cache holds: None without a cache; else the positions in it
        (0: a new pass) and the slot reorders made since the last forward. The cache is found by behaviour
        (:mod:`attnhooks.kvcache`), whatever the argument is called."""
        if self._continuing is not None:
            explicit, self._continuing = self._continuing, Past()  # `past` holds for the first forward only
            return explicit
        cache = find_cache(args, kwargs)
        if cache is None:
            return None
        parents = self._watch.take_parents() if cache is self._watch.cache else None
        self._watch.follow(cache)
        return Past(past_length(cache), parents)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd_depth = max(self._fwd_depth - 1, 0)
        if self._fwd_depth == 0 and self._capturing and output is not None:
            try:
                self._recorder.check()
            except CacheMismatchError:
                self._close_unit(failed=True)  # nothing of the step is committed
                raise
        if self._fwd_depth == 0 and self._gen_depth == 0:
            # always_call: on an exception the hook runs inside torch's except block with no output
            self._close_unit(failed=output is None and sys.exc_info()[0] is not None)

    def _generate_scope(self, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``model.generate``: the whole generation is one step; decode forwards continue it."""
        self._gen_depth += 1
        if self._gen_depth == 1:
            self._open_unit()
            self._recorder.begin_pass(False)
        try:
            out = generate(*args, **kwargs)
            if self._gen_depth == 1:
                self._auto_tokens((getattr(out, "sequences", out),), {})
            return out
        finally:
            self._gen_depth -= 1
            if self._gen_depth == 0:
                self._close_unit(failed=sys.exc_info()[0] is not None)

    def _open_unit(self, new_step: bool = True) -> None:
        """A top-level forward (or generate) begins: advance the step, decide, push the mode.

        A KV-cache continuation forward (``new_step=False``) stays in the step it continues.
        """
        if self._step_used and not self._manual and new_step:
            self._recorder.new_step(self._recorder.step + 1)
        elif not self._step_used:
            self._recorder.new_step(self._recorder.step)
        self._step_used = True
        if self._recorder.step % self.every:
            return
        if self.writer is not None:  # may raise the writer's error: before anything is entered
            self.writer.begin_step(self._recorder.step)
        self._capturing = True
        self._stack.clear()
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self._mode.__enter__()  # type: ignore[no-untyped-call]

    def _close_unit(self, failed: bool = False) -> None:
        """The captured forward (or generate) ended; ``failed`` when it raised: the store then
        keeps only what the step committed before (a half-run step is never committed)."""
        if not self._capturing:
            return
        self._capturing = False
        self._recorder.stager.synchronize()
        if self.writer is not None:
            if failed or self._recorder.dropping:
                self.writer.drop_step(count=not failed)
            else:
                self.writer.end_step()
        self._mode.forget()
        try:
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        finally:
            if self._fastpath is not None:
                torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None
            self._stack.clear()
        self._warn_silent()

    # -- Sink protocol (called by the interception layer) -------------------------------------
    def owner(self, module: nn.Module | None = None) -> str | None:
        if not self._capturing:
            return None
        if module is not None:
            name = self._selection.name_of(module)
            if name is not None:
                return name
        return self._stack[-1] if self._stack else None

    def heads(self, owner: str) -> int | None:
        module = self._modules_by_name.get(owner)
        for attr in _HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def on_attention(self, owner: str, event: AttentionEvent) -> None:
        module = self._modules_by_name.get(owner)
        cross = getattr(module, "is_cross_attention", None)
        self._recorder.take(owner, event, cross if isinstance(cross, bool) else None)
        if self._bar is not None:
            written = f", {self.writer.bytes_written / 2**20:.0f} MiB written" if self.writer is not None else ""
            self._bar.set_postfix_str(f"step {self._recorder.step} {owner}{written}", refresh=False)
            self._bar.update(1)

    def on_dropout(self, owner: str, p: float) -> None:
        self._recorder.dropout(owner, p)

    def wants_lse(self) -> bool:
        return bool({"lse", "summary"} & self._recorder.options.record)

    # -- tokens -------------------------------------------------------------------------------------
    def _auto_tokens(self, args: Any, kwargs: dict[str, Any]) -> None:
        if self.writer is None or not self._capturing:
            return
        ids = _as_ids(kwargs.get("input_ids", args[0] if args else None))
        if ids is not None:
            self.writer.tokens(ids, self._token_text(ids))

    def _token_text(self, ids: np.ndarray) -> list[list[str]] | None:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        return [[str(t) for t in convert([int(i) for i in row])] for row in ids]

    def _warn_silent(self) -> None:
        if self._checked_silent or self._selection.everything:
            return
        self._checked_silent = True
        seen = self._recorder.seen
        silent = [n for n in self._selection.names.values() if n not in seen]
        if silent:
            shown = ", ".join(repr(n) for n in silent[:8]) + (" ..." if len(silent) > 8 else "")
            warnings.warn(
                f"attnhooks: {len(silent)} selected module(s) made no attention call during the forward: "
                f"{shown}. Select the modules that compute attention, or declare a custom one with "
                "attnhooks.emit(self, q=..., k=..., attn=...) in its forward.",
                AttnHooksWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        state = "active" if self.active else "closed"
        return f"<Capture {state} step={self.step} records={len(self.records)}>"


def _progress_bar() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise RecordOptionError("capture(progress=True) needs tqdm: pip install 'attnhooks[progress]'") from err
    return tqdm(desc="attnhooks", unit=" call", dynamic_ncols=True)


def _as_ids(value: Any) -> np.ndarray | None:
    """Integer token ids as int64 ``[batch, len]``, or None when ``value`` is not ids."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        if value.dim() not in (1, 2):
            return None
        value = value.detach().cpu().numpy()
    elif isinstance(value, list) and value:
        rows = value if isinstance(value[0], list) else [value]
        ints = all(isinstance(r, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in r) for r in rows)
        if not ints or len({len(r) for r in rows}) != 1:
            return None
        value = np.asarray(rows, dtype=np.int64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim not in (1, 2):
        return None
    return value.reshape(-1, value.shape[-1]).astype(np.int64)


def _may_own_attention(module: nn.Module) -> bool:
    """False for torch.nn's built-in leaf layers: a softmax or SDPA inside one is not attention of
    its own, and skipping their hooks keeps the per-module cost off most module calls."""
    if module._modules or isinstance(module, nn.MultiheadAttention):
        return True
    return not type(module).__module__.startswith("torch.nn.modules.")


def _patch_generate(stack: ExitStack, obj: nn.Module, scope: Callable[..., Any]) -> None:
    """Route ``obj.generate`` through ``scope`` for the capture's lifetime (instance attribute)."""
    generate = getattr(obj, "generate", None)
    if not callable(generate):
        return
    had_own = "generate" in vars(obj)
    wrapped = functools.wraps(generate)(functools.partial(scope, generate))
    object.__setattr__(obj, "generate", wrapped)

    def restore() -> None:
        if vars(obj).get("generate") is wrapped:
            if had_own:
                object.__setattr__(obj, "generate", generate)
            else:
                del obj.__dict__["generate"]

    stack.callback(restore)
