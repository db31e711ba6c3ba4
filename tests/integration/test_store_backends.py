"""Stores written through :func:`attnhooks.capture` on small random Hugging Face models, on every
backend (memory, zarr, hdf5) and on Zarr on an fsspec URL (``memory://.../s.zarr``, fsspec's
in-process file system), read back with :func:`attnhooks.open_store` bit for bit against the
in-memory records. The backend protocol itself is tested in ``tests/unit/backends/``."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle

import fsspec
import h5py
import numpy as np
import pytest
import torch
import zarr

import attnhooks
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from attnhooks.schema import SCHEMA, module_path
from tests import models
from tests.unit.backends.conformance import ALL, KINDS, _assert_store_equals_records, _forget, _location


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def location(kind, tmp_path):
    """A fresh, not yet existing location for the backend under test; memory stores are forgotten after."""
    loc = _location(kind, tmp_path)
    yield loc
    _forget(loc)


@pytest.fixture(scope="module")
def llama():
    return models.llama()


@pytest.fixture(scope="module")
def bert():
    return models.bert()


class FakeTokenizer:
    """The one method a capture uses from a tokenizer."""

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


def _run(model, batches, **kwargs):
    """One capture: one forward (one step) per ``(batch, length)``; returns the capture."""
    with attnhooks.capture(model, **kwargs) as cap:
        for batch, length in batches:
            x, mask = models.ids(batch, length)
            model(input_ids=x, attention_mask=mask)
    return cap


def test_store_equals_records_bit_for_bit(location, llama):
    """Three steps (one with a padded sample) read back equal to the records, and to a capture
    without a store of the same forwards."""
    inputs = [models.ids(2, 7, pad_last=3), models.ids(1, 5), models.ids(3, 4)]

    def forwards():
        for x, mask in inputs:
            llama(input_ids=x, attention_mask=mask)

    with attnhooks.capture(llama, store=location, keep=True, record=ALL, compression="none") as cap:
        forwards()
    with attnhooks.capture(llama, record=ALL) as plain:
        forwards()
    assert len(cap.records) == 3 * 2
    with attnhooks.open_store(location) as st:
        assert st.backend.readonly, "open_store reads by default"
        assert st.steps == [0, 1, 2] and st.committed == 3
        assert st.modules == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert st.dropped == 0 and st.dropped_steps == []
        _assert_store_equals_records(st, cap.records)
    for a, b in zip(cap.records, plain.records, strict=True):  # a store does not change what is captured
        assert (a.module, a.step, a.call) == (b.module, b.step, b.call)
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in ALL), a
    with attnhooks.open_store(location) as st:
        mask = st.mask(st.modules[0], 0, 1)
        assert mask["causal"] and mask["dense"] is None and mask["window"] is None
        assert np.array_equal(mask["key_valid"], inputs[0][1][1].bool().numpy())
    with pytest.raises(attnhooks.NotAStoreError, match="mode"):
        attnhooks.open_store(location, mode="w")
    with attnhooks.open_store(location, mode="r+") as st:
        assert st.steps == [0, 1, 2] and not st.backend.readonly


def test_append_continues_step_ids_and_keeps_both_captures(location, llama):
    first = _run(llama, [(2, 6), (1, 4), (2, 3)], store=location, keep=True, record=ALL)
    second = _run(llama, [(3, 5), (1, 8)], store=location, keep=True, record=ALL, mode="append")
    assert sorted({r.step for r in second.records}) == [3, 4], "step ids continue after the committed ones"
    with attnhooks.open_store(location) as st:
        assert st.steps == [0, 1, 2, 3, 4] and st.committed == 5 and st.status == "complete"
        _assert_store_equals_records(st, first.records + second.records)


def test_append_rewrites_no_module_attribute_unless_one_is_lacking(kind, location, llama, monkeypatch):
    """A module group holding committed steps keeps its attributes as they are on an append (no metadata
    rewritten that a killed writer could tear); an attribute the store lacks (an older writer) is added."""
    _run(llama, [(2, 6)], store=location, record=ALL)
    group = module_path("model.layers.1.self_attn")
    with attnhooks.open_store(location) as st:
        before = st.backend.attrs(group)
        backend_type = type(st.backend.unwrapped)
    written: list[tuple[str, list[str]]] = []
    real = backend_type.set_attrs

    def spy(self, path, values):
        written.append((path, sorted(values)))
        real(self, path, values)

    monkeypatch.setattr(backend_type, "set_attrs", spy)
    _run(llama, [(1, 4)], store=location, record=ALL, mode="append")
    assert [w for w in written if w[0].startswith("modules/")] == []
    with attnhooks.open_store(location) as st:
        assert st.backend.attrs(group) == before and st.steps == [0, 1]
    if kind not in ("zarr", "hdf5"):
        return
    _forget_attr(location, group, "source")  # as a store written before the attribute existed
    written.clear()
    _run(llama, [(1, 4)], store=location, record=ALL, mode="append")
    assert [w for w in written if w[0] == group] == [(group, ["source"])]
    with attnhooks.open_store(location) as st:
        assert st.backend.attrs(group) == before and st.steps == [0, 1, 2]


def _forget_attr(location, path, key):
    """Remove one attribute of a group of a local Zarr or HDF5 store."""
    location = str(location)
    if location.endswith(".h5"):
        with h5py.File(location, "r+") as f:
            del f[path].attrs[key]
        return
    meta_path = os.path.join(location, path, "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["attributes"][key]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_variable_lengths_read_back_at_their_true_shapes(location, llama):
    """Steps of different batch sizes and lengths (longest first) read back at their own shapes,
    token ids and strings (through a tokenizer) included."""
    shapes = [(2, 9), (1, 4), (3, 6), (1, 1)]
    inputs = [models.ids(b, n, vocab=120)[0] + step for step, (b, n) in enumerate(shapes)]
    with attnhooks.capture(
        llama, store=location, keep=True, record=ALL, compression="gzip", tokenizer=FakeTokenizer()
    ) as cap:
        for x in inputs:
            llama(input_ids=x)
    module = "model.layers.1.self_attn"
    with attnhooks.open_store(location) as st:
        q_path = module_path(module, "q")
        assert st.backend.shape(q_path)[0] >= 4 and st.backend.shape(q_path)[2:] == (3, 4, 9, 16), "padded storage"
        for step, (batch, length) in enumerate(shapes):
            info = st.info(module, step)
            assert (info["batch"], info["q_len"], info["k_len"], info["k_stored"]) == (batch, length, length, length)
            for s in range(batch):
                assert st.q(module, step, s).shape == (4, length, 16)
                assert st.k(module, step, s).shape == (2, length, 16)
                assert st.attention(module, step, s).shape == (4, length, length)
                assert st.lse(module, step, s).shape == (4, length)
                ids = inputs[step][s].tolist()
                assert st.tokens(step, s) == (ids, [f"<{i}>" for i in ids])
            with pytest.raises(attnhooks.NotInStoreError, match="batch size"):
                st.attention(module, step, batch)
        _assert_store_equals_records(st, cap.records)


def test_metadata_and_token_ids(location, llama):
    inputs = [models.ids(1, 4)[0], models.ids(2, 3)[0]]
    with attnhooks.capture(llama, store=location, record=("q", "k", "lse"), buffer="64MiB") as cap:
        for x in inputs:
            llama(input_ids=x)
    assert cap.records == [], "keep defaults to False with a store"
    with attnhooks.open_store(location) as st:
        meta = st.metadata
        assert meta["schema"] == SCHEMA and st.schema == SCHEMA
        assert meta["status"] == "complete" == st.status
        assert meta["committed"] == 2 and meta["dropped"] == 0
        assert meta["model"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
        assert meta["created"] and meta["closed"] and meta["created"] <= meta["closed"]
        options = json.loads(meta["options"])
        assert options["record"] == ["k", "lse", "q"]
        assert options["mode"] == "create" and options["buffer"] == "64MiB" and options["dtype"] is None
        versions = meta["versions"]
        assert versions["attnhooks"] == attnhooks.__version__ and versions["torch"] == torch.__version__
        assert versions["numpy"] == np.__version__
        engine = {"zarr": ("zarr", zarr.__version__), "hdf5": ("h5py", h5py.__version__)}
        kind = type(getattr(st.backend, "unwrapped", st.backend)).name
        if kind in engine:
            assert versions[engine[kind][0]] == engine[kind][1]
        for layer, module in enumerate(st.modules):
            info = st.module_info(module)
            assert info["name"] == module and info["layer"] == layer
            assert (info["heads"], info["kv_heads"], info["head_dim"]) == (4, 2, 16)
            assert info["kind"] == "self" and info["causal"] is True
            assert info["scale"] == 0.25 and info["dtype"] == "float32" and info["bits"] is False
        for step, x in enumerate(inputs):
            for s in range(x.shape[0]):
                assert st.tokens(step, s) == (x[s].tolist(), None)
        with pytest.raises(attnhooks.NotInStoreError, match="attn"):
            st.attention(st.modules[0], 0, method="stored")
        with pytest.raises(attnhooks.NotInStoreError):
            st.module_info("model.layers.7.self_attn")
        with pytest.raises(attnhooks.NotInStoreError):
            st.q(st.modules[0], step=99)


@pytest.fixture(scope="module")
def llama_bf16(llama):
    return copy.deepcopy(llama).to(torch.bfloat16)


def test_storage_dtypes(location, llama, llama_bf16):
    """bfloat16 stored as float32 (default) or as raw bits: both read back exactly; float16 on request.
    Each capture overwrites the store of the one before."""
    for model, dtype, stored, raw in [
        (llama_bf16, None, "float32", "float32"),
        (llama_bf16, "bfloat16-bits", "bfloat16", "uint16"),
        (llama, "float16", "float16", "float16"),
    ]:
        cap = _run(model, [(2, 5)], store=location, keep=True, record=ALL, dtype=dtype, mode="overwrite")
        assert cap.records[0].q.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)
        with attnhooks.open_store(location) as st:
            assert st.steps == [0]
            for module in st.modules:
                info = st.module_info(module)
                assert info["dtype"] == stored, dtype
                assert info["bits"] is (dtype == "bfloat16-bits")
                assert st.backend.dtype(module_path(module, "q")) == raw
                assert st.backend.dtype(module_path(module, "k")) == raw
                assert st.backend.dtype(module_path(module, "attn")) == ("float16" if dtype == "float16" else "float32")
                assert st.backend.dtype(module_path(module, "lse")) == "float32"
            for rec in cap.records:
                for s in range(rec.q.shape[0]):
                    args = (rec.module, rec.step, s)
                    q, k, attn, lse = st.q(*args), st.k(*args), st.attention(*args), st.lse(*args)
                    assert attn.dtype == lse.dtype == np.float32
                    assert np.array_equal(lse, rec.lse[s].numpy())
                    if dtype == "float16":
                        assert q.dtype == k.dtype == np.float16
                        assert np.array_equal(q, rec.q[s].half().numpy())
                        assert np.array_equal(k, rec.k[s].half().numpy())
                        assert np.array_equal(attn, rec.attn[s].half().float().numpy())
                    else:
                        assert q.dtype == k.dtype == np.float32
                        assert np.array_equal(q, rec.q[s].float().numpy())
                        assert np.array_equal(k, rec.k[s].float().numpy())
                        assert np.array_equal(attn, rec.attn[s].numpy())


# -- errors ---------------------------------------------------------------------------------------


def test_refusals_leave_the_store_and_the_model_alone(location, llama, bert):
    """append to nothing, create over a store, append other modules: each refused with its error,
    no hook left behind (the conftest guard checks that), the store as it was."""
    x, mask = models.ids(1, 5)
    with pytest.raises(attnhooks.NotAStoreError):
        with attnhooks.capture(llama, store=location, mode="append"):
            llama(input_ids=x)
    first = _run(llama, [(1, 4)], store=location, keep=True, record=ALL)
    with pytest.raises(attnhooks.StoreExistsError, match="overwrite"):
        with attnhooks.capture(llama, store=location):
            llama(input_ids=x)  # never runs: the store is refused on entry
    with pytest.raises(attnhooks.StoreMismatchError, match=r"encoder\.layer\.0"):
        with attnhooks.capture(bert, store=location, mode="append"):
            bert(input_ids=x, attention_mask=mask)
    with attnhooks.open_store(location) as st:
        assert st.steps == [0]
        assert st.modules == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        _assert_store_equals_records(st, first.records)


def test_append_with_other_head_counts_raises_mismatch(tmp_path, llama):
    location = _location("memory", tmp_path)  # the check is the writer's: one backend is enough
    try:
        _run(llama, [(1, 4)], store=location)
        wider = models.llama(heads=8, kv_heads=2)
        x, _ = models.ids(1, 5)
        with pytest.raises(attnhooks.StoreMismatchError, match="heads"):
            with attnhooks.capture(wider, store=location, mode="append"):
                wider(input_ids=x)
    finally:
        MemoryBackend.delete(location)


def test_refused_append_leaves_the_store_appendable(tmp_path, llama, bert):
    location = _location("memory", tmp_path)  # the writer's behaviour: one backend is enough
    try:
        _run(llama, [(1, 4)], store=location)
        x, mask = models.ids(1, 5)
        with pytest.raises(attnhooks.StoreMismatchError):
            with attnhooks.capture(bert, store=location, mode="append"):
                bert(input_ids=x, attention_mask=mask)
        with attnhooks.open_store(location) as st:
            assert st.status == "complete"
        cap = _run(llama, [(1, 3)], store=location, keep=True, mode="append")
        assert {r.step for r in cap.records} == {1}
    finally:
        MemoryBackend.delete(location)


class ListInput(torch.nn.Module):
    """A model whose first argument is a list of differently sized inputs (as torchvision's
    detection models take images): nothing in it is token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, items):
        return [self.attn(x, x, x)[0] for x in items]


def test_a_list_argument_that_is_not_token_ids_is_not_stored_as_tokens(tmp_path):
    location = _location("memory", tmp_path)  # the capture's behaviour: one backend is enough
    model = ListInput().eval()
    items = [torch.randn(1, 3, 8), torch.randn(1, 5, 8)]
    try:
        with attnhooks.capture(model, store=location, keep=True) as cap:
            model(items)
        with attnhooks.open_store(location) as st:
            assert st.tokens(0) == ([], None)
            assert st.calls("attn", 0) == 2
            _assert_store_equals_records(st, [r for r in cap.records if r.q is not None])
    finally:
        MemoryBackend.delete(location)


def _not_a_store(kind, tmp_path, what):
    """Make something that is not an attnhooks store at a location of ``kind``; return it."""
    if kind == "memory":
        loc = _location(kind, tmp_path)
        be = MemoryBackend.open(loc, "w")
        be.create_group("modules")
        if what == "future":
            be.set_attrs("", {"schema": "attnhooks/99", "status": "complete", "committed": 0})
        return loc
    if kind in ("zarr", "fsspec"):  # a local path or a memory:// URL: fsspec and zarr take both
        loc = str(tmp_path / "x.zarr") if kind == "zarr" else _location(kind, tmp_path)
        fs, path = fsspec.url_to_fs(loc)
        if what == "text":
            fs.pipe_file(path, b"hello, I am not a store\n")
        elif what == "empty":
            fs.mkdir(path)
        elif what == "array":
            zarr.create_array(loc, shape=(2,), dtype="int64", zarr_format=3)
        else:
            group = zarr.open_group(loc, mode="w", zarr_format=3)
            group.create_group("modules")
            if what == "future":
                group.attrs.update({"schema": "attnhooks/99", "status": "complete", "committed": 0})
        return loc
    path = tmp_path / "x.h5"
    if what == "text":
        path.write_text("hello, I am not a store\n")
    elif what == "empty":
        path.write_bytes(b"")
    else:
        with h5py.File(path, "w") as f:
            f.create_group("modules")
            if what == "array":
                f.create_dataset("data", data=np.arange(3))
            if what == "future":
                f.attrs["schema"] = "attnhooks/99"
                f.attrs["status"] = "complete"
    return str(path)


NOT_STORES = {
    "memory": ["plain"],
    "zarr": ["text", "empty", "array", "plain"],
    "fsspec": ["text", "empty", "array", "plain"],
    "hdf5": ["text", "empty", "array", "plain"],
}


def test_opening_what_is_not_a_store_raises(kind, tmp_path, llama):
    """A text file, an empty file or directory, an engine file or group with no schema attribute,
    and a store of a future schema: all NotAStoreError (also for repair), never a crash."""
    for what in NOT_STORES[kind]:
        sub = tmp_path / what
        sub.mkdir()
        loc = _not_a_store(kind, sub, what)
        try:
            with pytest.raises(attnhooks.NotAStoreError) as err:
                attnhooks.open_store(loc)
            assert isinstance(err.value, ValueError) and loc in str(err.value), (what, str(err.value))
            with pytest.raises(attnhooks.NotAStoreError):
                attnhooks.repair(loc)
        finally:
            _forget(loc)
    loc = _not_a_store(kind, tmp_path, "future")
    try:
        with pytest.raises(attnhooks.NotAStoreError, match="attnhooks/99"):
            attnhooks.open_store(loc)
        x, _ = models.ids(1, 4)
        with pytest.raises(attnhooks.StoreMismatchError, match="attnhooks/99"):
            with attnhooks.capture(llama, store=loc, mode="append"):
                llama(input_ids=x)
    finally:
        _forget(loc)


def test_opening_a_store_never_unpickles(location, llama, monkeypatch):
    x, mask = models.ids(2, 6, pad_last=2)
    with attnhooks.capture(llama, store=location, keep=True, record=ALL, tokenizer=FakeTokenizer()) as cap:
        llama(input_ids=x, attention_mask=mask)
        llama(input_ids=x[:1, :3])

    unpickled = []

    def refuse(*args, **kwargs):
        unpickled.append(args)
        raise AssertionError("a store read unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    with attnhooks.open_store(location) as st:
        assert st.metadata["schema"] == SCHEMA and st.status == "complete"
        assert st.steps == [0, 1] and st.dropped_steps == []
        for module in st.modules:
            assert st.module_info(module)["name"] == module
            for step in st.steps:
                for call in range(st.calls(module, step)):
                    info = st.info(module, step, call)
                    for s in range(info["batch"]):
                        args = (module, step, s, call)
                        st.q(*args), st.k(*args), st.lse(*args), st.attention(*args), st.mask(*args)
        for step in st.steps:
            assert st.tokens(step, 0)[1] is not None
        _assert_store_equals_records(st, cap.records)
        repr(st)
    assert unpickled == []


# ================================================================================================
# Zarr on fsspec URLs
# ================================================================================================


def test_a_url_store_written_by_one_instance_reads_through_another(tmp_path, llama):
    location = _location("fsspec", tmp_path)
    try:
        writer = ZarrBackend.open(location, "w-")
        with attnhooks.capture(llama, store=writer, keep=True, record=ALL) as cap:
            for batch, length in [(2, 5), (1, 3)]:
                x, mask = models.ids(batch, length)
                llama(input_ids=x, attention_mask=mask)
        fs, path = fsspec.url_to_fs(location)  # fsspec's own view of the objects
        root = json.loads(fs.cat_file(f"{path}/zarr.json"))["attributes"]
        assert (root["schema"], root["status"], root["committed"]) == (SCHEMA, "complete", 2)
        with attnhooks.open_store(location) as st:
            assert type(st.backend.unwrapped) is ZarrBackend and st.backend is not writer
            assert st.steps == [0, 1]
            _assert_store_equals_records(st, cap.records)
    finally:
        _forget(location)


def test_a_store_of_schema_1_is_read_and_appended_to_as_it_is(kind, location, llama, monkeypatch):
    """A store written before stacks (attnhooks/1: an array per module) reads as before, and a
    capture appending to it keeps that layout (its readers may be older versions)."""
    import attnhooks.backends.stacks as stacks
    import attnhooks.write.attrs as attrs

    with monkeypatch.context() as old:  # what attnhooks 0.1 wrote
        old.setattr(attrs, "SCHEMA", "attnhooks/1")
        old.setattr(stacks, "MEMBER_BYTES", 0)
        first = _run(llama, [(2, 5)], store=location, keep=True, record=ALL)
    second = _run(llama, [(1, 3)], store=location, mode="append", keep=True, record=ALL)
    with attnhooks.open_store(location) as st:
        assert st.schema == "attnhooks/1" and st.steps == [0, 1]
        raw = getattr(st.backend, "unwrapped", st.backend)
        assert not raw.contains("stacks") and raw.contains(module_path(st.modules[0], "q"))
        records = list(first.records) + [dataclasses.replace(r, step=1) for r in second.records]
        _assert_store_equals_records(st, records)


def test_a_step_of_a_many_layer_model_is_a_handful_of_chunk_files(tmp_path):
    """Schema attnhooks/2 on Zarr: each stack gets one chunk file per step, whatever the layers."""
    layers = 12
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), layers, enable_nested_tensor=False
    ).eval()
    path = tmp_path / "run.zarr"
    with torch.no_grad(), attnhooks.capture(model, store=str(path), record=("q", "k", "lse"), keep=True) as cap:
        for step in range(3):
            cap.step = step
            model(torch.randn(2, 7, 16))
    chunk_files = [p for p in path.rglob("c.*") if p.is_file() and not p.name.endswith(".partial")]
    per_step = len(chunk_files) / 3
    assert per_step <= 10, f"{per_step:.1f} chunk files per step for {layers} layers"
    with attnhooks.open_store(path) as st:
        assert st.schema == SCHEMA and len(st.modules) == layers
        _assert_store_equals_records(st, cap.records)
