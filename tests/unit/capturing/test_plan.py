"""The interception plan: a Hugging Face model whose calls all come through the attention registry is
captured through the registry alone from its second capture on, with records identical to the full
torch-function mode's; anything else keeps the mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import attnhooks
from attnhooks.capturing import plan, staging
from attnhooks.capturing.intercept import direct
from attnhooks.capturing.select import WRAPPER_SEGMENTS, named_modules
from attnhooks.capturing.streams import rows_of
from attnhooks.errors import AttnHooksWarning
from tests import models


def _run(model, fn, **kw):
    with torch.no_grad(), attnhooks.capture(model, **kw) as cap:
        out = fn()
    return cap, out


def _same_records(a, b):
    assert [(r.module, r.call, r.step, r.q_offset, r.k_offset, r.k_len, r.source) for r in a] == [
        (r.module, r.call, r.step, r.q_offset, r.k_offset, r.k_len, r.source) for r in b
    ]
    for x, y in zip(a, b):
        for name in ("q", "k", "attn", "lse"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert (tx is None) == (ty is None), name
            assert tx is None or torch.equal(tx, ty), f"{x.module} {name} differs between the plans"
        assert x.scale == y.scale and x.mask.causal == y.mask.causal and x.mask.offset == y.mask.offset
        assert (x.mask.dense is None) == (y.mask.dense is None)
        assert x.mask.key_valid is None or torch.equal(x.mask.key_valid, y.mask.key_valid)


@pytest.mark.parametrize(
    "record, modules",
    [
        (("q", "k", "lse"), None),
        (("q", "k"), None),
        (("attn", "q", "k"), "model.layers.*"),
        (("summary",), "model.layers.*.self_attn"),
    ],
)
def test_registry_plan_records_exactly_what_the_mode_records(record, modules):
    model = models.llama()
    x, mask = models.ids(batch=2, length=6, pad_last=2)

    def gen():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)

    first, out1 = _run(model, gen, record=record, modules=modules)
    second, out2 = _run(model, gen, record=record, modules=modules)
    assert first._plan.kind == plan.MODE and second._plan.kind == plan.REGISTRY
    assert torch.equal(out1, out2)
    assert len(first.records) == 2 * 4 and {r.call for r in first.records} == {0}
    _same_records(first.records, second.records)
    forward1, _ = _run(model, lambda: model(x, attention_mask=mask), record=record, modules=modules)
    forward2, _ = _run(model, lambda: model(x, attention_mask=mask), record=record, modules=modules)
    assert forward2._plan.kind == plan.REGISTRY
    _same_records(forward1.records, forward2.records)
    plan.forget(model)
    third, _ = _run(model, gen, record=record, modules=modules)
    assert third._plan.kind == plan.MODE


def _masks_equal(a, b, shape):
    batch, _, q_len, k_len = shape
    x, y = (m.additive(batch, q_len, k_len) for m in (a, b))
    x, y = (torch.zeros(batch, 1, q_len, k_len) if m is None else m for m in (x, y))
    return torch.equal(*torch.broadcast_tensors(x, y))


def test_registry_calls_go_direct_only_after_a_call_of_their_kind_agreed_with_the_kernel(monkeypatch):
    monkeypatch.setattr(direct, "VERDICTS", direct.Verdicts())
    model = models.llama()
    x, mask = models.ids(batch=2, length=6, pad_last=2)

    def gen():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)

    _run(model, gen, record=("q", "k"))  # learns the plan: everything under the mode
    assert not direct.VERDICTS._known
    checked, _ = _run(model, gen, record=("q", "k"))
    kinds = direct.VERDICTS._known
    assert kinds and all(kinds.values()), "prefill and decode calls each checked once, and agreed"
    assert {key[3] for key in kinds} == {True, False}  # a decode kind and a prefill kind
    calls = []
    monkeypatch.setattr(direct, "agrees", lambda *a: calls.append(a) or None)
    fast, _ = _run(model, gen, record=("q", "k"))
    assert not calls, "kinds already checked are not checked again"
    _same_records(checked.records, fast.records)
    for r, s in zip(checked.records, fast.records):
        assert _masks_equal(r.mask, s.mask, (2, 4, rows_of(r), r.k_len))
    # in the kernel's sdpa calls, the mode saw 4 query heads over 2 KV heads (GQA): unpacked, deduplicated
    assert fast.records[0].q.shape[1] == 4 and fast.records[0].k.shape[1] == 2


def test_a_registry_call_that_disagrees_with_the_kernel_warns_and_stays_on_the_mode(monkeypatch):
    monkeypatch.setattr(direct, "VERDICTS", direct.Verdicts())
    model = models.llama()
    x, mask = models.ids(batch=2, length=6, pad_last=2)
    reference, _ = _run(model, lambda: model(x, attention_mask=mask), record=("q", "k"))
    real = direct.direct_event

    def wrong_scale(*a, **kw):
        event = real(*a, **kw)
        event.scale = 0.5
        return event

    monkeypatch.setattr(direct, "direct_event", wrong_scale)
    with pytest.warns(AttnHooksWarning, match="scale"):
        first, _ = _run(model, lambda: model(x, attention_mask=mask), record=("q", "k"))
    assert list(direct.VERDICTS._known.values()) == [False]
    second, _ = _run(model, lambda: model(x, attention_mask=mask), record=("q", "k"))  # no second warning
    for cap in (first, second):
        _same_records(reference.records, cap.records)  # the kernel's scale, not the wrong one


def test_the_plan_is_learned_per_selection_and_only_from_captured_units():
    model = models.llama()
    x, _ = models.ids(batch=1, length=5)
    with torch.no_grad(), attnhooks.capture(model, record=("q",), every=2) as cap:
        model(x)
        model(x)  # step 1: not captured
    assert cap._plan.kind == plan.MODE
    other, _ = _run(model, lambda: model(x), record=("q",), modules="model.layers.0.self_attn")
    assert other._plan.kind == plan.MODE, "learned for another selection"
    again, _ = _run(model, lambda: model(x), record=("q",))
    assert again._plan.kind == plan.REGISTRY, "every=2 captured step 0 under the mode"


def test_eager_models_and_models_of_other_modules_keep_the_mode():
    eager = models.llama("eager")
    x, _ = models.ids(batch=1, length=5)
    for _ in range(2):
        cap, _ = _run(eager, lambda: eager(x), record=("q", "k"))
        assert cap._plan.kind == plan.MODE and len(cap.records) == 2
    wrapped = nn.Sequential(models.llama())
    for _ in range(2):
        cap, _ = _run(wrapped, lambda: wrapped(x), record=("q",))
        assert cap._plan.kind == plan.MODE and len(cap.records) == 2


def test_a_call_outside_the_registry_keeps_the_mode():
    model = models.llama()
    attn = model.model.layers[1].self_attn

    def own_sdpa(hidden_states, position_embeddings=None, attention_mask=None, **kw):
        b, n, _ = hidden_states.shape
        q = attn.q_proj(hidden_states).view(b, n, -1, 16).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(b, n, -1, 16).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(b, n, -1, 16).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return attn.o_proj(y.transpose(1, 2).reshape(b, n, -1)), None

    attn.forward = own_sdpa  # a forward replaced on the instance: not eligible by construction
    x, _ = models.ids(batch=1, length=5)
    for _ in range(2):
        cap, _ = _run(model, lambda: model(x, use_cache=False), record=("q",))
        assert cap._plan.kind == plan.MODE
        assert [r.source for r in cap.records] == ["sdpa", "sdpa"]
    del attn.forward
    hooked = models.llama()

    def extra_attention(module, args, output):  # a hook computing attention outside the registry
        h = output.view(*output.shape[:2], 4, 16).transpose(1, 2)
        F.scaled_dot_product_attention(h, h, h)

    handle = hooked.model.layers[0].mlp.register_forward_hook(extra_attention)
    try:
        for _ in range(2):
            cap, _ = _run(hooked, lambda: hooked(x, use_cache=False), record=("q",))
            assert cap._plan.kind == plan.MODE, "learned: a call came from outside the registry"
            assert sorted(r.module for r in cap.records)[0] == "model.layers.0.mlp" and len(cap.records) == 3
    finally:
        handle.remove()


def _reference_names(model):
    named = {}
    for name, module in model.named_modules():
        named[".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)] = module
    return named


def test_named_modules_match_torch_names_with_wrapper_segments_left_out():
    shared = nn.Linear(2, 2)
    inner = nn.Sequential(nn.Linear(2, 2), shared)
    model = nn.Module()
    model.add_module("_orig_mod", nn.Sequential(inner, shared))
    model.add_module("head", nn.ModuleDict({"_checkpoint_wrapped_module": nn.Linear(2, 2), "b": None, "c": inner}))
    model.add_module("tail", shared)
    ours = named_modules(model)
    assert list(ours) == list(_reference_names(model))
    assert all(ours[n] is m for n, m in _reference_names(model).items())
    llama = models.llama()
    assert list(named_modules(llama)) == [n for n, _ in llama.named_modules()]


def test_a_capture_held_open_switches_to_the_registry_plan_after_its_first_unit():
    model = models.llama()
    x, mask = models.ids(batch=2, length=6, pad_last=2)
    with torch.no_grad(), attnhooks.capture(model, record=("q", "k", "attn")) as cap:
        model(x, attention_mask=mask)
        assert cap._plan.kind == plan.MODE and cap._hooks.handles
        model(x, attention_mask=mask)
        assert cap._plan.kind == plan.REGISTRY and not cap._hooks.handles
    steps = [[r for r in cap.records if r.step == s] for s in (0, 1)]
    for r in steps[1]:
        r.step = 0
    _same_records(steps[0], steps[1])


def _encoder(layers=3):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@pytest.mark.parametrize("modules", [None, "layers.*"])
@pytest.mark.parametrize("training", [True, False])
def test_torch_plan_records_exactly_what_the_mode_records(modules, training):
    model = _encoder().train(training)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, -2:] = True
    runs = []
    for torch_plan in (True, False):
        cap = attnhooks.capture(model, record=("q", "k", "attn", "lse"), modules=modules)
        cap._plan._torch_only = torch_plan  # False: the full mode, for comparison
        with torch.set_grad_enabled(training), cap:
            out = model(x, src_key_padding_mask=mask)
            if training:
                out.sum().backward()
        assert cap._plan.kind == (plan.TORCH if torch_plan else plan.MODE)
        runs.append((cap.records, out))
    assert torch.equal(runs[0][1], runs[1][1])
    assert len(runs[0][0]) == 3 and {r.source for r in runs[0][0]} == {"mha"}
    assert runs[0][0][0].module == ("layers.0.self_attn" if modules is None else "layers.0")
    _same_records(runs[0][0], runs[1][0])
    assert all(r.mask.key_valid is not None and not r.mask.key_valid[1, -1] for r in runs[0][0])  # the padding


def test_a_forward_describes_its_mask_tensor_once_and_a_new_forward_again():
    model = models.llama(layers=3)
    x, mask = models.ids(batch=2, length=6, pad_last=2)
    with torch.no_grad(), attnhooks.capture(model, record=("q",)) as cap:
        model(x, attention_mask=mask)
        model(x, attention_mask=mask)
    first, second = cap.records[:3], cap.records[3:]
    assert all(r.mask.key_valid is not None for r in cap.records)
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x's SDPA path slices the mask anew in every layer
        assert first[0].mask is first[1].mask is first[2].mask, "one description per mask tensor and forward"
    assert all(torch.equal(r.mask.key_valid, first[0].mask.key_valid) for r in first)
    assert second[0].mask is not first[0].mask and torch.equal(second[0].mask.key_valid, first[0].mask.key_valid)


@pytest.mark.parametrize("make", [models.llama, _encoder])
def test_a_capture_and_its_records_are_freed_when_dropped_without_a_garbage_collection(make):
    import gc
    import weakref

    model = make()
    x = models.ids(batch=1, length=5)[0] if make is models.llama else torch.randn(1, 5, 16)
    gc.disable()
    try:
        for _ in range(2):  # the second one under the learned plan, for the llama
            with torch.no_grad(), attnhooks.capture(model, record=("q", "k")) as cap:
                model(x)
            alive, kept = weakref.ref(cap), weakref.ref(cap.records[0].q)
            del cap
            assert alive() is None, "a reference cycle keeps the capture until a collection"
            # the record's buffer is freed, or kept for reuse by the thread's recycler alone
            buffers = [t for kept_of_shape in staging.recycler()._buffers.values() for t in kept_of_shape]
            assert kept() is None or any(t is kept() for t in buffers), "a reference cycle keeps the records"
    finally:
        gc.enable()
