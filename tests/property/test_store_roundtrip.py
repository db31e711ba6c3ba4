"""Property tests: what a capture streams to a store reads back bit for bit, on every backend.

A model's attention module declares calls of random shapes through :func:`attnhooks.emit` (q and
k, GQA included; the capture computes the probabilities and lse). Steps differ
in batch size, number of calls and sequence lengths; q and k are float32, float16 or bfloat16,
stored as they are or converted by ``dtype=``. Everything read back through
:func:`attnhooks.open_store` must equal what the model emitted (q, k) and what the capture kept
(attn, lse), bit for bit, at the call's true shape. A second property drives the backends
directly with random grow / write sequences against a numpy model of the array.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import attnhooks
from attnhooks.backends.hdf5 import HDF5Backend
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from tests.property.common import SETTINGS

BACKENDS = {"memory": MemoryBackend, "zarr": ZarrBackend, "hdf5": HDF5Backend}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# a store round trip costs a writer thread, files and a few hundred reads per example: fewer examples
# than the other property tests (ATTNHOOKS_MAX_EXAMPLES still sets them for a deeper run)
_DEEP = "ATTNHOOKS_MAX_EXAMPLES" in os.environ
CAPTURE_SETTINGS = settings(SETTINGS, max_examples=SETTINGS.max_examples if _DEEP else 12)
BACKEND_SETTINGS = settings(SETTINGS, max_examples=SETTINGS.max_examples if _DEEP else 20)


class Emitter(nn.Module):
    """An attention module whose calls are given to it: it declares each through ``emit``."""

    def forward(self, calls):
        for q, k in calls:
            attnhooks.emit(self, q=q, k=k)


class Model(nn.Module):
    def __init__(self, n_modules: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Emitter() for _ in range(n_modules))

    def forward(self, *, plan):  # keyword only: nothing here looks like token ids
        for layer, calls in zip(self.layers, plan):
            layer(calls)


@dataclass
class Case:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # of q and k in the model
    store_dtype: str | None  # capture(dtype=...)
    n_modules: int
    steps: list[tuple[int, list[tuple[int, int]]]]  # per step: batch, [(q_len, k_len) per call]
    seed: int


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(sorted(TORCH_DTYPES)))
    store_dtypes = [None, "float32", "float16"] + (["bfloat16-bits"] if dtype == "bfloat16" else [])
    lengths = st.tuples(st.integers(1, 40), st.integers(1, 40))
    step = st.tuples(st.integers(1, 3), st.lists(lengths, min_size=1, max_size=2))
    return Case(
        heads=heads,
        kv_heads=draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])),
        head_dim=draw(st.integers(1, 16)),
        dtype=dtype,
        store_dtype=draw(st.sampled_from(store_dtypes)),
        n_modules=1,  # several modules: the unit suite; here every draw goes to shapes and dtypes
        steps=draw(st.lists(step, min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _location(kind: str, root) -> str:
    name = f"s-{uuid.uuid4().hex}"
    if kind == "memory":
        return f"memory://{name}"
    return str(root / (name + (".zarr" if kind == "zarr" else ".h5")))


def _forget(kind: str, location: str) -> None:
    if kind == "memory":
        MemoryBackend.delete(location)
    elif kind == "zarr":
        shutil.rmtree(location, ignore_errors=True)
    elif os.path.exists(location):
        os.remove(location)


def _stored(t: torch.Tensor, store_dtype: str | None) -> np.ndarray:
    """What the store must return for q or k emitted as ``t``."""
    if store_dtype == "float16":
        return t.half().numpy()
    if store_dtype == "float32" or t.dtype == torch.bfloat16:  # bfloat16: float32 or raw bits, widened exactly
        return t.float().numpy()
    return t.numpy()


def _plans(case: Case):
    """Per step, per module, the calls' (q, k) tensors."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = TORCH_DTYPES[case.dtype]

    def tensor(*shape):
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    return [
        [
            [
                (tensor(b, case.heads, lq, case.head_dim), tensor(b, case.kv_heads, lk, case.head_dim))
                for lq, lk in calls
            ]
            for _ in range(case.n_modules)
        ]
        for b, calls in case.steps
    ]


@pytest.mark.parametrize("kind", sorted(BACKENDS))
@CAPTURE_SETTINGS
@given(case=cases())
def test_emitted_calls_read_back_bit_for_bit(kind, case, tmp_path):
    model = Model(case.n_modules)
    plans = _plans(case)
    location = _location(kind, tmp_path)
    try:
        with attnhooks.capture(
            model, store=location, keep=True, record=("attn", "q", "k", "lse"), dtype=case.store_dtype
        ) as cap:
            for plan in plans:
                model(plan=plan)
        records = {(r.step, r.module, r.call): r for r in cap.records}
        n_calls = sum(len(calls) for _, calls in case.steps) * case.n_modules
        assert len(records) == len(cap.records) == n_calls

        with attnhooks.open_store(location) as store:
            assert store.status == "complete" and store.steps == list(range(len(plans)))
            assert store.modules == [f"layers.{i}" for i in range(case.n_modules)]
            for module in store.modules:
                info = store.module_info(module)
                assert (info["heads"], info["kv_heads"], info["head_dim"]) == (case.heads, case.kv_heads, case.head_dim)
            for step, plan in enumerate(plans):
                for m, calls in enumerate(plan):
                    module = f"layers.{m}"
                    assert store.calls(module, step) == len(calls)
                    for call, (q, k) in enumerate(calls):
                        rec = records[(step, module, call)]
                        meta = store.info(module, step, call)
                        batch, _, q_len, _ = q.shape
                        assert (meta["batch"], meta["q_len"], meta["k_len"]) == (batch, q_len, k.shape[2])
                        for s in range(batch):
                            args = (module, step, s, call)
                            got_q, got_k = store.q(*args), store.k(*args)
                            want_q, want_k = _stored(q[s], case.store_dtype), _stored(k[s], case.store_dtype)
                            assert got_q.dtype == want_q.dtype and got_k.dtype == want_k.dtype
                            assert got_q.shape == want_q.shape and got_k.shape == want_k.shape
                            assert np.array_equal(got_q, want_q), ("q", args)
                            assert np.array_equal(got_k, want_k), ("k", args)
                            attn = rec.attn[s].half().float() if case.store_dtype == "float16" else rec.attn[s]
                            got_attn = store.attention(*args)
                            assert got_attn.dtype == np.float32 and got_attn.shape == (case.heads, q_len, k.shape[2])
                            assert np.array_equal(got_attn, attn.numpy()), ("attn", args)
                            assert np.array_equal(store.lse(*args), rec.lse[s].numpy()), ("lse", args)
    finally:
        _forget(kind, location)


class Materialising(nn.Module):
    """An attention module with an opaque kernel (here: its probabilities are handed to it) that
    declares them with ``attn=``."""

    def forward(self, *, q, k, probs):
        attnhooks.emit(self, q=q, k=k, attn=probs)
        return probs


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Materialising()

    def forward(self, **kwargs):
        return self.attn(**kwargs)


def test_emitted_probabilities_read_back_bit_for_bit(tmp_path):
    """Deterministic (a property once it passes): one shape, the memory backend."""
    kind, shape, seed = "memory", (2, 3, 5, 7, 4), 0
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g)
    probs = torch.softmax(torch.randn(b, h, lq, lk, generator=g), dim=-1)
    model = Wrapper()
    location = _location(kind, tmp_path)
    try:
        with attnhooks.capture(model, store=location, keep=True) as cap:
            model(q=q, k=k, probs=probs)
        with attnhooks.open_store(location) as store:
            assert store.modules == ["attn"] and [r.module for r in cap.records] == ["attn"]
            for s in range(b):
                assert np.array_equal(store.attention("attn", 0, s), probs[s].numpy())
                assert np.array_equal(store.q("attn", 0, s), q[s].numpy())
                assert np.array_equal(store.k("attn", 0, s), k[s].numpy())
    finally:
        _forget(kind, location)


# -- backends alone: random growth and writes against a numpy model --------------------------------

FILLS = {"float32": -2.5, "float16": 1.5, "int64": -1, "bool": False, "uint16": 7}


@st.composite
def array_programs(draw):
    """An array (dtype, initial shape, chunks) and a list of operations: ("grow", new_shape) or
    ("write", selection, seed)."""
    dtype = draw(st.sampled_from(sorted(FILLS)))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    ops = []
    current = shape
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            current = tuple(n + draw(st.integers(0, 3)) for n in current)
            ops.append(("grow", current))
        elif all(current):
            sel = []
            for n in current:
                if draw(st.booleans()):
                    sel.append(draw(st.integers(0, n - 1)))
                else:
                    start = draw(st.integers(0, n - 1))
                    sel.append(slice(start, draw(st.integers(start + 1, n))))
            ops.append(("write", tuple(sel), draw(st.integers(0, 2**31 - 1))))
    return dtype, shape, chunks, ops


def _values(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("int64", "uint16"):
        return rng.integers(0, 60000, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("kind", sorted(BACKENDS))
@BACKEND_SETTINGS
@given(program=array_programs())
def test_backend_arrays_follow_a_numpy_model(kind, program, tmp_path):
    dtype, shape, chunks, ops = program
    cls = BACKENDS[kind]
    location = _location(kind, tmp_path)
    model = np.full(shape, FILLS[dtype], dtype=dtype)
    be = cls.open(location, "w-")
    try:
        be.create_array("a/x", shape, dtype, chunks, FILLS[dtype], cls.default_codec)
        for op in ops:
            if op[0] == "grow":
                grown = np.full(op[1], FILLS[dtype], dtype=dtype)
                grown[tuple(slice(0, n) for n in model.shape)] = model
                model = grown
                be.resize("a/x", op[1])
            else:
                value = _values(dtype, model[op[1]].shape, op[2])
                model[op[1]] = value
                be.write("a/x", op[1], value)
            assert be.shape("a/x") == model.shape
        be.flush()
        be.close()
        be = cls.open(location, "r")
        got = be.read("a/x")
        assert be.dtype("a/x") == dtype and got.dtype == np.dtype(dtype)
        assert got.shape == model.shape and np.array_equal(got, model)
    finally:
        be.close()
        _forget(kind, location)
