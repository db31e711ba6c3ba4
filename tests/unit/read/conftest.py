"""Small stores for the reader's units: :mod:`stores`' models captured into ``memory://`` stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

import attnhooks
from attnhooks.backends.memory import MemoryBackend

from .stores import STEPS, inputs, layers


@pytest.fixture
def memory_location() -> Iterator[str]:
    """A fresh ``memory://`` location, forgotten after the test."""
    location = f"memory://test-read-{uuid.uuid4().hex}"
    yield location
    MemoryBackend.delete(location)


@pytest.fixture
def store(memory_location: str) -> Iterator[attnhooks.Store]:
    """Steps 5 and 9 of :func:`stores.layers`, batch 2 of 3 tokens, attn, q, k and lse stored."""
    model = layers()
    with attnhooks.capture(model, store=memory_location, record=("attn", "q", "k", "lse")) as cap, torch.no_grad():
        for step in STEPS:
            cap.step = step
            model(inputs(step))
    with attnhooks.open_store(memory_location) as st:
        yield st
