"""Decode rows: a decode call taken without an event (``Recorder.row``) makes exactly the record the event
path (``Recorder.take``) makes of the same call, in memory and in a store; the cases the short way does not
handle still reach the event path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.capturing import recorder
from tests import models


def _same(a, b, where):
    """Two records (or masks) equal field by field; tensors bit for bit, with their dtypes and strides."""
    assert type(a) is type(b), where
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        here = f"{where}.{field.name}"
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), here
            assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), here
            assert torch.equal(x, y), here
        elif dataclasses.is_dataclass(x):
            _same(x, y, here)
        else:
            assert x == y, f"{here}: {x!r} != {y!r}"


@pytest.fixture
def counted(monkeypatch):
    """Counts the decode calls ``Recorder.row`` took; ``counted.off()`` sends every call to ``take``."""

    class Counter:
        taken = 0
        on = True

        def off(self):
            self.on = False

    counter = Counter()
    row = recorder.Recorder.row

    def counting(self, *args):
        if not counter.on:
            return False
        taken = row(self, *args)
        counter.taken += taken
        return taken

    monkeypatch.setattr(recorder.Recorder, "row", counting)
    return counter


def _generate(model, x, mask, record, n=6, **kw):
    with torch.no_grad(), attnhooks.capture(model, record=record, **kw) as cap:
        model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return cap.records


@pytest.mark.parametrize("record", [("q", "k", "lse"), ("q", "k"), ("lse",), ("k",)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_rows_are_the_records_the_event_path_makes(counted, record, padded):
    model = models.llama()  # 4 heads over 2 KV heads: transformers' GQA handling on the way to the kernel
    x, mask = models.ids(batch=2, length=5, pad_last=2 if padded else 0)
    short = _generate(model, x, mask, record)
    taken = counted.taken
    counted.off()
    events = _generate(model, x, mask, record)
    assert taken == 2 * 5, "every decode call of both layers went the short way (5 decode forwards)"
    assert counted.taken == taken, "none with row() off"
    assert len(short) == len(events) == 2 * 6
    for i, (a, b) in enumerate(zip(short, events)):
        _same(a, b, f"record {i}")


def test_records_that_keep_more_than_q_k_lse_take_the_event_path(counted):
    model = models.llama()
    x, mask = models.ids(batch=1, length=4)
    records = _generate(model, x, mask, ("attn", "q"))
    assert counted.taken == 0
    assert all(r.attn is not None for r in records) and len(records) == 2 * 6
    _generate(model, x, mask, ("q", "k"), verify=True)
    assert counted.taken == 0, "verify= checks each call against the kernel's output: events"


def test_beam_search_records_are_the_event_paths_whichever_way_each_call_went(counted):
    # a forward after a reorder goes the event way (its records carry their slot map); whether transformers
    # reorders before every decode forward depends on its version: the records must not
    model = models.llama()
    x, mask = models.ids(batch=1, length=4)

    def beams():
        with torch.no_grad(), attnhooks.capture(model, record=("q", "k", "lse")) as cap:
            model.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, num_beams=2, pad_token_id=0)
        return cap.records

    short = beams()
    counted.off()
    events = beams()
    assert any(r.parents is not None for r in short), "the reordered forwards' records carry their slot map"
    assert len(short) == len(events)
    for i, (a, b) in enumerate(zip(short, events)):
        _same(a, b, f"record {i}")


def test_a_store_written_from_decode_rows_reads_back_as_one_written_from_events(counted, tmp_path):
    model = models.llama()
    x, mask = models.ids(batch=2, length=5, pad_last=1)
    _generate(model, x, mask, ("q", "k", "lse"), store=str(tmp_path / "rows.zarr"))
    assert counted.taken == 10
    counted.off()
    _generate(model, x, mask, ("q", "k", "lse"), store=str(tmp_path / "events.zarr"))
    rows, events = attnhooks.open_store(tmp_path / "rows.zarr"), attnhooks.open_store(tmp_path / "events.zarr")
    assert rows.modules == events.modules and rows.steps == events.steps == [0]
    for module in rows.modules:
        for sample in (0, 1):
            for read in ("q", "k", "lse"):
                a, b = getattr(rows, read)(module, 0, sample), getattr(events, read)(module, 0, sample)
                assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), (module, sample, read)
            a, b = rows.mask(module, 0, sample), events.mask(module, 0, sample)
            assert a.keys() == b.keys()
            for name in a:
                assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), (module, sample, name)
