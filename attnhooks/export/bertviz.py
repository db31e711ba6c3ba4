"""Stored attention in other tools' formats: :meth:`Store.to_bertviz`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attnhooks.errors import StoreOptionError

if TYPE_CHECKING:
    from attnhooks.read.store import Store

__all__ = ["to_bertviz"]


def to_bertviz(
    store: Store,
    step: int | None = None,
    sample: int = 0,
    *,
    modules: str | Sequence[str] | None = None,
    call: int = 0,
    method: str = "auto",
) -> tuple[tuple[Any, ...], list[str]]:
    """``(attention, tokens)`` as BertViz's ``head_view`` / ``model_view`` take them (see
    :meth:`attnhooks.Store.to_bertviz`)."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a dependency of attnhooks
        raise StoreOptionError("to_bertviz() needs torch (BertViz takes torch tensors)") from err
    names = store.select(modules)
    layers = []
    for name in names:
        attn = store.attention(name, step, sample, call, method=method)
        if attn.shape[-1] != attn.shape[-2]:
            raise StoreOptionError(
                f"to_bertviz(): {name!r} has {attn.shape[-2]} query rows over {attn.shape[-1]} keys; BertViz's "
                "self-attention views need square matrices (pass modules= the self-attention layers of one stack)"
            )
        layers.append(torch.from_numpy(attn)[None])
    sizes = {int(t.shape[-1]) for t in layers}
    if len(sizes) > 1:
        raise StoreOptionError(
            f"to_bertviz(): the modules attend over different lengths {sorted(sizes)} (an encoder and a decoder?); "
            "pass modules= one stack, e.g. modules='encoder.**'"
        )
    n = sizes.pop()
    return tuple(layers), _tokens(store, step, sample, n)


def _tokens(store: Store, step: int | None, sample: int, n: int) -> list[str]:
    """The sample's token strings (ids, then positions, when no strings were stored), ``n`` of them."""
    ids, text = store.tokens(step, sample)
    tokens = text if text else [str(i) for i in ids]
    tokens = tokens[:n]
    return tokens + [str(i) for i in range(len(tokens), n)]
