"""KV caches as a capture sees them: found by what they do, not by a keyword's name.

A top-level forward *continues* the step when it is given a non-empty KV cache, whatever the
argument is called (transformers 4.x and 5.x before 5.25 pass ``past_key_values=``, 5.25
``cache=``; other libraries their own names). A cache is recognised by its behaviour: an object
with a callable ``get_seq_length()`` (every ``transformers.Cache``), or the legacy form, a tuple
of per-layer ``(key, value, ...)`` tuples of 4-D tensors.

The recorder does not *assume* how the cache evolved between two forwards; it is told and it
checks. :class:`CacheWatch` wraps the cache's own ``reorder_cache`` (beam search) and ``crop``
(assisted decoding) on the instance for the forward's lifetime, so the batch-slot reorders are
known exactly, and the recorder compares the keys the kernel receives with the keys it recorded
(:class:`~attnhooks.recorder.Recorder`), raising :class:`~attnhooks.errors.CacheMismatchError`
when they contradict each other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch

from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.intercept.event import AttentionEvent
from attnhooks.errors import CacheMismatchError

__all__ = [
    "CacheWatch",
    "KeyChecks",
    "Past",
    "find_cache",
    "hides_keys_from",
    "key_parents",
    "looks_cross",
    "past_length",
    "unused_slots_removed",
]

# methods of a transformers Cache that change its contents between two forwards
_WATCHED = ("reorder_cache", "crop")


@dataclass
class Past:
    """What a forward's cache held when the forward began.

    Attributes:
        length: positions already in the cache (the keys a self-attention call's new keys
            extend); None when the forward's cache gives no length (then the recorder's own count
            is used, and checked against the keys).
        parents: ``[batch]`` int64: slot ``b`` of this forward continues slot ``parents[b]`` of the
            previous one (the cache was reordered, as beam search does); None: unchanged.
    """

    length: int | None = None
    parents: torch.Tensor | None = None


def find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's arguments, by behaviour; None when there is none."""
    for value in (*kwargs.values(), *args):
        if _is_cache(value):
            return value
    return None


def past_length(cache: Any) -> int:
    """Positions held by ``cache`` (0 for an empty one), by its ``get_seq_length()`` or, in the
    legacy tuple form, the key length of its first layer."""
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())
    return int(cache[0][0].shape[-2]) if cache and cache[0] else 0


def _is_cache(value: Any) -> bool:
    if value is None or isinstance(value, (torch.Tensor, str, bytes, int, float, bool)):
        return False
    if callable(getattr(value, "get_seq_length", None)):
        return True
    if isinstance(value, (tuple, list)) and value and all(isinstance(layer, (tuple, list)) for layer in value):
        first = value[0]
        return len(first) >= 2 and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in first[:2])
    return False


class CacheWatch:
    """Watches one cache object between forwards: its reorders (``reorder_cache(beam_idx)``) are
    composed into one slot map, its crops noted. Installed on the instance, removed by ``close``.

    A cache without these methods (a legacy tuple, a custom class) is not watched: the recorder's
    key check is then what notices a change it was not told about.
    """

    def __init__(self, on_crop: Callable[[int], None] | None = None) -> None:
        self._on_crop = on_crop  # told the cache's length after each crop
        self._cache: Callable[[], Any] = lambda: None  # held weakly: the watch never keeps a cache alive
        self._stack = ExitStack()
        self._parents: torch.Tensor | None = None

    @property
    def cache(self) -> Any:
        """The cache watched now, None when none (or it was freed)."""
        return self._cache()

    def follow(self, cache: Any) -> None:
        """Watch ``cache`` (a new object replaces the one watched before)."""
        if cache is self.cache:
            return
        self.close()
        try:
            self._cache = weakref.ref(cache)
        except TypeError:  # a tuple (the legacy form) cannot be watched, only checked
            return
        for name in _WATCHED:
            method = getattr(cache, name, None)
            if callable(method) and not isinstance(cache, (tuple, list)):
                self._wrap(cache, name, method)

    def take_parents(self) -> torch.Tensor | None:
        """The composed slot map of the reorders since the last call (None: none happened)."""
        parents, self._parents = self._parents, None
        return parents

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._cache = lambda: None
        self._parents = None

    def _wrap(self, cache: Any, name: str, method: Callable[..., Any]) -> None:
        own = vars(cache).get(name)  # an instance attribute to put back (else the class's method)
        ref = weakref.ref(cache)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if name == "reorder_cache":
                self._reordered(args[0] if args else kwargs.get("beam_idx"))
            out = method(*args, **kwargs)
            live = ref()
            if name == "crop" and self._on_crop is not None and live is not None:
                self._on_crop(past_length(live))  # its length, read back: whatever crop's argument meant
            return out

        try:
            object.__setattr__(cache, name, watched)
        except (AttributeError, TypeError):
            return  # a slotted or frozen cache: the key check still sees what changed
        handle = weakref.ref(watched)

        def restore() -> None:  # holds the cache weakly: a finished generation's cache is freed
            live = ref()
            if live is not None and vars(live).get(name) is handle():
                if own is not None:
                    object.__setattr__(live, name, own)
                else:
                    delattr(live, name)

        self._stack.callback(restore)

    def _reordered(self, beam_idx: Any) -> None:
        index = torch.as_tensor(beam_idx).detach().to("cpu", torch.int64).reshape(-1)
        # slot b now holds what slot index[b] held; after an earlier reorder p, that was p[index[b]]
        self._parents = index if self._parents is None else self._parents[index]


def looks_cross(event: AttentionEvent, past: int | None) -> bool:
    """A call of a new stream attends over another sequence's keys (cross-attention): its keys are
    not the forward's own positions (``past + q_len`` of them, or a static buffer's hidden tail)."""
    _, _, q_len, k_len = event.shape
    if past is None:
        return q_len != k_len
    if k_len == past + q_len:
        return False
    return not (k_len > past + q_len and hides_keys_from(event, past + q_len))


def hides_keys_from(event: AttentionEvent, n: int) -> bool:
    """True when the call hides every key from ``n`` on from every query row: by its mask, or in an
    eager call by its scores (``-inf``, or transformers' ``finfo.min``)."""
    q_len, k_len = event.shape[2:]
    if event.scores is not None:
        tail = event.scores[..., n:].detach()
        return bool((tail <= torch.finfo(tail.dtype).min / 2).all())
    return (event.mask or MaskSpec()).hides_keys_from(n, q_len, k_len)


def unused_slots_removed(owner: str, event: AttentionEvent, n: int) -> AttentionEvent:
    """The call over its first ``n`` keys only: a static cache hands the kernel its whole buffer, whose
    slots past the written positions the mask hides. Raises when the mask does not hide them."""
    if not hides_keys_from(event, n):
        raise CacheMismatchError(
            f"{owner!r}: the kernel received {event.shape[3]} keys but the forward's cache holds only {n} positions "
            "(with this call's), and the mask does not hide the rest; the cache's length does not describe its keys"
        )

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[..., :n]

    return replace(
        event,
        k=None if event.k is None else event.k[:, :, :n],
        v=None if event.v is None else event.v[:, :, :n],
        attn=first(event.attn),
        scores=first(event.scores),
        # (an eager call's mask is read from its scores later)
        mask=None if event.mask is None else event.mask.first_keys(n, event.shape[2], event.shape[3]),
    )


def key_parents(parents: torch.Tensor, k_new: int) -> torch.Tensor:
    """``[batch, k_new]``: the slot preceding each new key; the first new key follows the reorder."""
    batch = parents.numel()
    out = torch.arange(batch, dtype=torch.int64)[:, None].repeat(1, k_new)
    if k_new:
        out[:, 0] = parents
    return out


class KeyChecks:
    """The keys a forward's kernel received, compared with the keys a capture recorded, slot by slot: a
    reorder or crop the capture was not told of, or keys edited by hand, make them differ (in some layer).

    On the CPU a comparison is made at once; on a device it is queued as a tensor and read by
    :meth:`settle`, once per forward, so that the hot path makes no host synchronisation.
    """

    def __init__(self) -> None:
        self._differ: list[tuple[tuple[str, int, int], torch.Tensor]] = []

    def queue(
        self,
        where: tuple[str, int, int],
        tail: torch.Tensor,
        k: torch.Tensor,
        at: int,
        behind: int,
        parents: torch.Tensor | None,
    ) -> None:
        """Compare the kernel's key ``k[:, :, at]`` (the last position the cache held before this forward)
        with the recorded one: the last of ``tail`` (a stream's last recorded keys) but ``behind``.

        Args:
            where: ``(module, step, call)``, for the message.
            tail: ``[batch, kv_heads, n, head_dim]`` the stream's last recorded keys.
            k: ``[batch, kv_heads, k_len, head_dim]`` the kernel's keys.
            at: the kernel's index of that position (negative: a rolling cache kept no earlier key).
            behind: positions recorded past it (a crop the capture was told of).
            parents: the forward's slot map (its cache was reordered), or None.
        """
        if parents is not None:
            if parents.numel() != tail.shape[0] or int(parents.max()) >= tail.shape[0]:
                owner, step, call = where
                raise CacheMismatchError(
                    f"{owner!r} (step {step}, call {call}): the cache was reordered with {parents.numel()} "
                    f"slots but the stream has {tail.shape[0]}"
                )
            tail = tail[parents.to(tail.device)]
        kept = tail.size(2)
        last = kept - behind - 1  # the tail's index of the position
        if last < 0 or at < 0:
            return  # cropped past the tail, or a rolling cache kept no earlier key: only the counts are checked
        with torch._C.DisableTorchFunction():  # our own ops: no mode sees them
            # [batch, kv_heads, 1, head_dim] each; a decode step's tail is its one key (no view made)
            new, old = k.narrow(2, at, 1), tail if kept == 1 else tail.narrow(2, last, 1)
            if new.is_cpu:  # checked at once
                if not torch.equal(new, old):
                    self._differ.append((where, torch.ones((), dtype=torch.bool)))
            elif new.shape != old.shape:
                self._differ.append((where, torch.ones((), dtype=torch.bool)))
            else:
                self._differ.append((where, (new != old).any()))

    def settle(self) -> None:
        """Raise :class:`CacheMismatchError` when a comparison queued since the last call differed."""
        differ, self._differ = self._differ, []
        for (owner, step, call), flag in differ:
            if bool(flag):
                raise CacheMismatchError(
                    f"{owner!r} (step {step}, call {call}): the keys in the forward's KV cache differ from the "
                    "keys the capture recorded for this stream: the cache was changed between forwards in a "
                    "way attnhooks was not told (reordered or edited by hand?). Reorder it with the cache's "
                    "reorder_cache(beam_idx), or start a new step (a forward without the cache)."
                )
