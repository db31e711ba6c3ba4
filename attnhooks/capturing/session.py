"""The capture session: watch a model's attention calls while it runs, with nothing left behind.

Lifecycle: hooks, the registry patch and the ``generate`` scope are installed on ``__enter__``
into an ``ExitStack`` and removed in ``__exit__`` (also after a partial install or an exception
in the forward). The torch-function mode and the MHA fast-path switch are active only while a
captured step's forward runs.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, cast

import torch.nn as nn

from attnhooks.capturing.distributed import RankInfo, current
from attnhooks.capturing.hooks import ModuleHooks
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.capturing.intercept.hf import RegistryPatch
from attnhooks.capturing.intercept.mode import AttentionMode
from attnhooks.capturing.options import CaptureOptions
from attnhooks.capturing.passes import Passes
from attnhooks.capturing.plan import REGISTRY, Plan
from attnhooks.capturing.record import Record
from attnhooks.capturing.recorder import Recorder
from attnhooks.capturing.select import declared_heads, named_modules, select, unwrap, warn_silent
from attnhooks.capturing.sink import StepSink, StoreOpener
from attnhooks.capturing.streams import assemble
from attnhooks.capturing.tokens import stored_ids
from attnhooks.errors import (
    CaptureStateError,
    RecordOptionError,
)

__all__ = ["Capture"]


class Capture:
    """A running capture; use :func:`attnhooks.capture` to make one (its options are documented there).

    Attributes:
        records: every :class:`Record` kept, in call order (empty when streaming to a store
            unless ``keep=True``).
        every: capture one step in ``every``.
        writer: the :class:`~attnhooks.write.writer.StoreWriter` while streaming to a store, else None.
        rank: this process's :class:`~attnhooks.capturing.distributed.RankInfo` while it writes its group of a
            rank set (under ``torch.distributed``), else None.
    """

    def __init__(self, model: nn.Module, options: CaptureOptions, open_store: StoreOpener | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise RecordOptionError(f"capture() takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.options = options
        self._chain = unwrap(model)
        self._modules_by_name = named_modules(self._chain[-1])
        self._selection = select(self._chain[-1], options.modules, self._modules_by_name)
        self.every = options.every
        self._recorder = Recorder(options.record)
        self._progress = _progress_bar if options.progress else None
        self._bar: Any = None
        self._recorder.keep = options.keep
        self._open_store_with = open_store
        self.rank: RankInfo | None = None
        self._process: RankInfo | None = None
        self.tokenizer = options.tokenizer
        self.writer: StepSink | None = None
        # the helpers hold this capture weakly: no reference cycle, so a capture made per step is freed,
        # with its records, as soon as it is dropped (not at the next garbage collection)
        me = cast("Capture", weakref.proxy(self))
        self._mode = AttentionMode(me)
        self._exit: ExitStack | None = None
        self._stack: list[str] = []  # the selected modules running now, innermost last
        self._registry = RegistryPatch(
            me, functools.partial(getattr, self._recorder, "events"), self._mode, self._stack
        )
        self._plan = Plan(self._chain, self._modules_by_name, self._selection.names.values())
        self._hooks = ModuleHooks(me)
        self._cross: dict[str, bool | None] = {}  # a module's own is_cross_attention, if it says
        self._checked_silent = False
        self._passes = Passes(me)

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
        self._passes.take_step(value)

    @property
    def active(self) -> bool:
        """True inside the ``with`` block."""
        return self._exit is not None

    def assemble(self, module: str, step: int | None = None, call: int = 0) -> Record:
        """One record for a whole call stream: prefill plus every KV-cache continuation.

        See :func:`attnhooks.capturing.streams.assemble`; ``step`` defaults to the last captured step.
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
        with self._passes.continuing(past):
            yield

    def set_tokens(self, ids: Any, text: list[list[str]] | None = None) -> None:
        """Tokens of the current step for the store: ``ids`` ``[batch, len]`` (tensor, array or
        lists), ``text`` the matching token strings. Top-level forwards given ``input_ids`` and
        ``generate`` record their ids (and strings, with ``tokenizer=``) without this call."""
        if self.writer is None:
            raise CaptureStateError("set_tokens() needs a capture streaming to a store (capture(..., store=...))")
        if not stored_ids(self.writer, self.tokenizer, ids, text):
            raise RecordOptionError(f"set_tokens(ids=...): expected integer ids [batch, len], got {type(ids).__name__}")

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
            self._passes.close_unit(failed=exc[0] is not None)
        finally:
            if stack is not None:
                stack.close()
            self._passes.reset()
            self._stack.clear()
            self._hooks.clear()

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
        kind = self._plan.choose()  # how narrowly calls are intercepted (see plan.py)
        for root in self._chain:
            stack.callback(root.register_forward_pre_hook(self._passes.root_pre, with_kwargs=True).remove)
            # prepend: when captures nest on one model, the last one opened closes first (LIFO)
            post = root.register_forward_hook(self._passes.root_post, prepend=True, always_call=True)
            stack.callback(post.remove)
        self._hooks.install(stack, kind)
        self._registry.install(kind == REGISTRY)
        stack.callback(self._registry.remove)
        stack.callback(self._passes.watch.close)
        for obj in self._chain:
            _patch_generate(stack, obj, self._passes.generate_scope)

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
        if writer.last_step is not None and not self._passes.manual:
            rec.step = writer.last_step + 1
        elif self._passes.manual:
            self._passes.check_step(rec.step)  # (assigned before the store was open)

    def _close_store(self) -> None:
        writer, self.writer = self.writer, None
        self._recorder.listener = self._recorder.admit = None
        if writer is not None:
            writer.close()

    def _narrow(self) -> None:
        """Between captured units: switch to the ``"registry"`` plan once a unit of this capture showed
        that the registry sees every call (:mod:`attnhooks.capturing.plan`); the module hooks go."""
        self._hooks.remove()
        self._registry.narrow = True
        self._plan.kind = REGISTRY

    # -- Sink protocol (called by the interception layer) -------------------------------------
    def owner(self, module: nn.Module | None = None) -> str | None:
        if not self._passes.capturing:
            return None
        if module is not None:
            name = self._selection.names.get(id(module))  # (Selection.name_of, without its call)
            if name is None and self._registry.narrow:
                name = self._plan.owner_of(module, self._selection.names)
            if name is not None:
                return name
        return self._stack[-1] if self._stack else None

    def heads(self, owner: str) -> int | None:
        return declared_heads(self._modules_by_name.get(owner))

    def on_attention(self, owner: str, event: AttentionEvent) -> None:
        self._plan.saw(through_registry=self._registry.depth > 0)
        if owner not in self._cross:  # looked up once per module: nn.Module's __getattr__ is slow for a missing name
            flag = getattr(self._modules_by_name.get(owner), "is_cross_attention", None)
            self._cross[owner] = flag if isinstance(flag, bool) else None
        self._recorder.take(owner, event, self._cross[owner])
        if self._bar is not None:
            written = f", {self.writer.bytes_written / 2**20:.0f} MiB written" if self.writer is not None else ""
            self._bar.set_postfix_str(f"step {self._recorder.step} {owner}{written}", refresh=False)
            self._bar.update(1)

    def on_row(self, owner: str, *call: Any) -> bool:  # not a module seen cross-attending or not seen yet
        taken = self._bar is None and not self._cross.get(owner, True) and self._recorder.row(owner, *call)
        if taken:
            self._plan.saw(through_registry=self._registry.depth > 0)
        return taken

    def on_dropout(self, owner: str, p: float) -> None:
        self._recorder.dropout(owner, p)

    def wants_lse(self) -> bool:
        return self._recorder.builder.wants_lse

    def verifies(self) -> bool:
        return self._recorder.options.verify > 0

    # -- tokens -------------------------------------------------------------------------------------
    def _auto_tokens(self, args: Any, kwargs: dict[str, Any]) -> None:
        if self.writer is not None and self._passes.capturing:
            stored_ids(self.writer, self.tokenizer, kwargs.get("input_ids", args[0] if args else None))

    def _warn_silent(self) -> None:
        if not self._checked_silent:
            self._checked_silent = True
            warn_silent(self._selection, self._recorder.seen)

    def __repr__(self) -> str:
        state = "active" if self.active else "closed"
        return f"<Capture {state} step={self.step} records={len(self.records)}>"


def _progress_bar() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise RecordOptionError("capture(progress=True) needs tqdm: pip install 'attnhooks[progress]'") from err
    return tqdm(desc="attnhooks", unit=" call", dynamic_ncols=True)


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
