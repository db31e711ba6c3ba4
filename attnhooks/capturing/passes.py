"""Which forwards belong to which step: a top-level forward opens a step (a *unit*) unless its KV
cache says it continues one, a ``generate()`` call is one unit whatever it runs, and the torch-function
mode and the MHA fast-path switch are active only while a captured unit runs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from attnhooks.capturing.kvcache import CacheWatch, Past, find_cache, past_length
from attnhooks.capturing.plan import MODE
from attnhooks.errors import CacheMismatchError, CaptureStateError, RecordOptionError

if TYPE_CHECKING:
    from attnhooks.capturing.session import Capture

__all__ = ["Passes"]


class Passes:
    """The forwards and ``generate`` scopes of one :class:`~attnhooks.capturing.session.Capture`."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap
        self.capturing = False  # a captured unit is running
        self.manual = False  # the user assigned cap.step: steps change only when assigned
        self.watch = CacheWatch(on_crop=self.cropped)
        self.captured: set[int] = set()  # the step ids whose forwards were captured
        self._fwd_depth = 0
        self._gen_depth = 0
        self._step_used = False
        self._fastpath: bool | None = None
        self._mode_pushed = False
        self._continuing: Past | None = None

    def take_step(self, step: int) -> None:
        """``cap.step = step``: from now on the step changes only when assigned. A step id is used
        once: assigning one whose forwards were captured already is refused (its calls would be
        lost, or the store would list the step twice)."""
        self.check_step(step)
        self.manual = True
        self._step_used = False
        self.cap._recorder.step = step

    def check_step(self, step: int) -> None:
        """Refuse a step id that holds data already, in this capture or in the store appended to."""
        writer = self.cap.writer
        if writer is not None and writer.holds(step):
            raise CaptureStateError(
                f"cap.step = {step}: the store being appended to holds step {step} already; a step id is used once "
                f"per store (its calls would be hidden). Continue after its last step ({writer.last_step}), e.g. "
                "cap.step = last + 1, or let the capture number the steps"
            )
        if step in self.captured:
            raise CaptureStateError(
                f"cap.step = {step}: step {step} was captured already in this capture; a step id is used once "
                "(its calls would be replaced). Assign a new id, e.g. a global step counter, or keep the "
                "assignment: every forward until the next assignment is part of the same step"
            )

    def reset(self) -> None:
        self._fwd_depth = self._gen_depth = 0

    @contextlib.contextmanager
    def continuing(self, past: int | None = None) -> Iterator[None]:
        """See :meth:`Capture.continuing`."""
        if past is not None and (not isinstance(past, int) or isinstance(past, bool) or past < 0):
            raise RecordOptionError(f"continuing(past={past!r}): give the cache's length, a non-negative int")
        outer, self._continuing = self._continuing, Past(length=past)
        try:
            yield
        finally:
            self._continuing = outer

    def root_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._fwd_depth += 1
        if self._fwd_depth > 1:
            return
        past = self.past(args, kwargs)
        continuation = past is not None and (past.length is None or past.length > 0)
        if self._gen_depth == 0:
            self.open_unit(new_step=not continuation)
            if not continuation:
                self.cap._auto_tokens(args, kwargs)
        self.cap._recorder.begin_pass(continuation, past)
        self.cap._mode.forget()

    def cropped(self, length: int) -> None:
        if self.capturing:
            self.cap._recorder.crop(length)

    def past(self, args: Any, kwargs: dict[str, Any]) -> Past | None:
        """What a top-level forward's KV cache holds: None without a cache; else the positions in it
        (0: a new pass) and the slot reorders made since the last forward. The cache is found by behaviour
        (:mod:`attnhooks.capturing.kvcache`), whatever the argument is called."""
        if self._continuing is not None:
            explicit, self._continuing = self._continuing, Past()  # `past` holds for the first forward only
            return explicit
        cache = find_cache(args, kwargs)
        if cache is None:
            return None
        parents = self.watch.take_parents() if cache is self.watch.cache else None
        self.watch.follow(cache)
        return Past(past_length(cache), parents)

    def root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd_depth = max(self._fwd_depth - 1, 0)
        if self._fwd_depth == 0 and self.capturing and output is not None:
            try:
                self.cap._recorder.check()
            except CacheMismatchError:
                self.close_unit(failed=True)  # nothing of the step is committed
                raise
        if self._fwd_depth == 0 and self._gen_depth == 0:
            # always_call: on an exception the hook runs inside torch's except block with no output
            self.close_unit(failed=output is None and sys.exc_info()[0] is not None)

    def generate_scope(self, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``model.generate``: the whole generation is one step; decode forwards continue it."""
        self._gen_depth += 1
        if self._gen_depth == 1:
            self.open_unit()
            self.cap._recorder.begin_pass(False)
        try:
            out = generate(*args, **kwargs)
            if self._gen_depth == 1:
                self.cap._auto_tokens((getattr(out, "sequences", out),), {})
            return out
        finally:
            self._gen_depth -= 1
            if self._gen_depth == 0:
                self.close_unit(failed=sys.exc_info()[0] is not None)

    def open_unit(self, new_step: bool = True) -> None:
        """A top-level forward (or generate) begins: advance the step, decide, push the mode.

        A KV-cache continuation forward (``new_step=False``) stays in the step it continues.
        """
        if self._step_used and not self.manual and new_step:
            self.cap._recorder.new_step(self.cap._recorder.step + 1)
        elif not self._step_used:
            self.cap._recorder.new_step(self.cap._recorder.step)
        self._step_used = True
        if self.cap._recorder.step % self.cap.every:
            return
        if self.cap.writer is not None:  # may raise the writer's error: before anything is entered
            self.cap.writer.begin_step(self.cap._recorder.step)
        if self.cap._plan.learned and not self.cap._registry.narrow:
            self.cap._narrow()  # a capture held open across steps: its first unit showed the registry suffices
        self.capturing = True
        self.captured.add(self.cap._recorder.step)
        self.cap._stack.clear()
        if self.cap._registry.narrow:
            return  # the registry wrapper pushes the mode around each call it wraps (plan.py)
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        if self.cap._plan.kind == MODE:  # under the "torch" plan, each nn.MultiheadAttention pushes it
            self.cap._mode.__enter__()  # type: ignore[no-untyped-call]
            self._mode_pushed = True

    def close_unit(self, failed: bool = False) -> None:
        """The captured forward (or generate) ended; ``failed`` when it raised: the store then
        keeps only what the step committed before (a half-run step is never committed)."""
        if not self.capturing:
            return
        self.capturing = False
        self.cap._recorder.stager.synchronize()
        if self.cap.writer is not None:
            if failed or self.cap._recorder.dropping:
                self.cap.writer.drop_step(count=not failed)
            else:
                self.cap.writer.end_step()
        self.cap._mode.forget()
        self.cap._plan.learn(failed)
        try:
            if self._mode_pushed:
                self._mode_pushed = False
                self.cap._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        finally:
            if self._fastpath is not None:
                torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None
            self.cap._stack.clear()
        self.cap._warn_silent()
