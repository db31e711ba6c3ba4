"""Row windows: full attention stored only for chosen query rows (``capture(..., rows=)``); every
other row stays exactly rebuildable from q, k and lse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.backends.memory import MemoryBackend
from tests import models

TOL = 1e-5


@pytest.fixture(params=["memory", "zarr", "hdf5"])
def location(request, tmp_path):
    if request.param != "memory":
        yield str(tmp_path / f"run.{'zarr' if request.param == 'zarr' else 'h5'}")
        return
    loc = f"memory://{request.node.name}"
    yield loc
    MemoryBackend.delete(loc)


def _eager_reference(make, x, mask):
    sdpa, eager = models.same_weights(make, "eager")
    with torch.no_grad():
        ref = eager(input_ids=x, attention_mask=mask, output_attentions=True).attentions
    return sdpa, ref


def test_last_rows_of_each_call_are_stored_and_the_rest_rebuilt(location):
    x, mask = models.ids(batch=2, length=20)
    model, ref = _eager_reference(models.llama, x, mask)
    record = ("attn", "q", "k", "lse")
    with (
        torch.no_grad(),
        attnhooks.capture(model, store=location, record=record, rows=slice(-6, None), keep=True) as cap,
    ):
        model(input_ids=x, attention_mask=mask)
    for rec in cap.records:
        assert rec.attn.shape == (2, 4, 6, 20) and rec.attn_rows == ((14, 20),)
    st = attnhooks.open_store(location)
    module = st.modules[1]
    want = ref[1][1].numpy()
    stored = st.attention(module, 0, 1, rows=slice(14, 20), method="stored")
    assert np.abs(stored - want[:, 14:]).max() <= TOL
    with pytest.raises(attnhooks.NotInStoreError, match=r"rows 14\.\.19"):
        st.attention(module, 0, 1, rows=slice(10, 16), method="stored")
    whole = st.attention(module, 0, 1)  # auto: stored rows read, the others rebuilt
    assert np.abs(whole - want).max() <= TOL


def test_several_windows_in_stream_positions_across_a_generation(location):
    x, _ = models.ids(batch=1, length=10)
    model, eager = models.same_weights(models.llama, "eager")
    windows = [slice(2, 5), slice(9, 13)]  # a prefill window and one that spans prefill and decode rows
    with torch.no_grad(), attnhooks.capture(model, store=location, record=("attn", "q", "k", "lse"), rows=windows):
        out = model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = eager(input_ids=out, output_attentions=True).attentions
    st = attnhooks.open_store(location)
    n = out.shape[1] - 1
    for layer, module in enumerate(st.modules):
        want = ref[layer][0, :, :n, :n].numpy()
        for w in windows:
            got = st.attention(module, 0, rows=w, method="stored")
            assert np.abs(got - want[:, w]).max() <= TOL
        assert np.abs(st.attention(module, 0) - want).max() <= TOL
        with pytest.raises(attnhooks.NotInStoreError):
            st.attention(module, 0, rows=slice(5, 9), method="stored")


def test_rows_needs_attn_and_valid_slices():
    model = models.llama()
    with pytest.raises(attnhooks.RecordOptionError, match="attn"):
        attnhooks.capture(model, record=("q", "k"), rows=slice(-4, None))
    with pytest.raises(attnhooks.RecordOptionError, match="step"):
        attnhooks.capture(model, rows=slice(0, 8, 2))


def test_assemble_joins_row_windows_of_a_generation():
    """In memory, a generation's windows (the last 2 rows of each forward call: prefill rows 4-5
    and every decode row) join into one record whose attn rows are listed in ``attn_rows``."""
    model, eager = models.same_weights(models.llama, "eager")
    x, _ = models.ids(batch=1, length=6)
    with torch.no_grad(), attnhooks.capture(model, rows=slice(-2, None)) as cap:
        out = model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = eager(input_ids=out[:, :8], output_attentions=True).attentions
    for layer in range(2):
        full = cap.assemble(f"model.layers.{layer}.self_attn", 0)
        assert full.q.shape[2] == 8 and full.attn_rows == ((4, 8),)
        assert full.attn.shape == (1, 4, 4, 8)
        assert (full.attn - ref[layer][:, :, 4:8]).abs().max() <= TOL
    with torch.no_grad(), attnhooks.capture(model, rows=[slice(1, 2), slice(7, 8)]) as cap:
        model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    full = cap.assemble("model.layers.1.self_attn", 0)  # the first decode call has no row in a window
    assert full.attn_rows == ((1, 2), (7, 8))
    assert (full.attn[:, :, 0] - ref[1][:, :, 1]).abs().max() <= TOL
    assert (full.attn[:, :, 1] - ref[1][:, :, 7]).abs().max() <= TOL
