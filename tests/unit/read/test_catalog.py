"""The catalogue of one store: its steps, its modules in model order, each module's tables, and the
errors that name what the store does hold."""

from __future__ import annotations

import pytest

import attnhooks
from attnhooks.errors import NotAStoreError, NotInStoreError
from attnhooks.read.catalog import Catalog

from .stores import LAYERS, STEPS


def _catalog(st: attnhooks.Store) -> Catalog:
    """A catalogue made afresh from the store's backend (not the store's own)."""
    return Catalog(st.backend, st.location, st.committed)


def test_steps_and_their_positions(store):
    catalog = _catalog(store)
    assert catalog.steps == list(STEPS) == store.steps
    assert [catalog.position(step) for step in STEPS] == [0, 1]
    assert catalog.position(None) == 0, "no step: the first stored"
    assert catalog.has_step(9) and not catalog.has_step(6)


def test_a_missing_step_names_the_steps_there_are(store):
    with pytest.raises(NotInStoreError, match=r"has no step 6; its steps are \[5, 9\]"):
        _catalog(store).position(6)
    with pytest.raises(NotInStoreError, match=r"has no step 6; its steps are \[5, 9\]"):
        store.attention("0.self_attn", 6)


def test_a_store_with_no_committed_step_says_so(store):
    catalog = Catalog(store.backend, store.location, committed=0)
    assert catalog.steps == [] and not catalog.has_step(5)
    with pytest.raises(NotInStoreError, match="has no committed steps yet"):
        catalog.position(None)


def test_committed_beyond_the_steps_array_is_not_a_store(store):
    with pytest.raises(NotAStoreError, match="committed=1000 but the steps array is shorter"):
        Catalog(store.backend, store.location, committed=1000)


def test_modules_are_in_model_order_with_their_group_paths(store):
    catalog = _catalog(store)
    expected = [f"{i}.self_attn" for i in range(LAYERS)]
    assert catalog.modules == expected == store.modules, "layer 10 after layer 9, not after layer 1"
    paths = catalog.module_paths()
    assert list(paths) == expected
    for name in expected:
        assert catalog.module_path(name) == paths[name] == store.module_path(name)
        assert paths[name].startswith("modules/") and store.backend.contains(paths[name])


def test_a_missing_module_names_modules_there_are(store):
    with pytest.raises(NotInStoreError, match=r"has no module '1\.self'; it has e\.g\. \['1\.self_attn'"):
        _catalog(store).module_path("1.self")
    with pytest.raises(NotInStoreError, match=r"has no module 'nope'; it has e\.g\. \['0\.self_attn', '1\.self_attn'"):
        store.module_path("nope")
    with pytest.raises(NotInStoreError, match="has no module 'nope'"):
        store.q("nope", 5)


def test_tables_are_read_once_and_cut_to_the_committed_steps(store):
    catalog = _catalog(store)
    tables = catalog.tables("3.self_attn")
    assert catalog.tables("3.self_attn") is tables, "read once"
    assert tables.attrs["kind"] == "self" and tables.attrs["heads"] == 2
    assert {"attn", "q", "k", "lse"} <= tables.leaves
    assert tables.calls.tolist() == [1, 1]
    assert tables.info.shape[:2] == (2, 1) and tables.scalars.shape[:2] == (2, 1)
    assert catalog.calls("3.self_attn", 9) == 1 == store.calls("3.self_attn", 9)
    info = catalog.info("3.self_attn", 9)
    assert info == store.info("3.self_attn", 9)
    assert (info["batch"], info["q_len"], info["k_len"]) == (2, 3, 3)


def test_a_call_is_located_or_refused_naming_what_there_is(store):
    catalog = _catalog(store)
    layout = catalog.layout("2.self_attn", 9, 1, 0, leaf="q")
    assert (layout.position, layout.call, layout.sample) == (1, 0, 1)
    assert layout.base == catalog.module_path("2.self_attn") and (layout.heads, layout.kv_heads) == (2, 2)
    assert layout.info == catalog.info("2.self_attn", 9)
    with pytest.raises(NotInStoreError, match=r"'2\.self_attn' has 1 call\(s\) at step 9; call=1 is not one of them"):
        catalog.layout("2.self_attn", 9, 0, 1)
    with pytest.raises(NotInStoreError, match="sample=2 is out of range: the call has batch size 2"):
        catalog.layout("2.self_attn", 9, 2, 0)
    with pytest.raises(
        NotInStoreError, match=r"has no 'parent' in this store \(recorded: \['attn', 'q', 'k', 'lse'\]\)"
    ):
        catalog.layout("2.self_attn", 9, 0, 0, leaf="parent")


def test_select_and_resolve_by_name_glob_and_layer(store):
    catalog = _catalog(store)
    assert catalog.of_kind("self") == catalog.modules and catalog.of_kind("cross") == []
    assert catalog.select() == catalog.modules
    assert catalog.select(kind="cross") == catalog.modules, "no module of that kind: all of them"
    assert catalog.select("1*.self_attn") == ["1.self_attn", "10.self_attn"]
    assert catalog.resolve() == "0.self_attn" and catalog.resolve(-1) == "10.self_attn"
    assert catalog.resolve("2") == "2.self_attn" and catalog.resolve("9.*") == "9.self_attn"
    with pytest.raises(NotInStoreError, match=f"layer {LAYERS} is out of range: .* has {LAYERS} layers"):
        catalog.resolve(LAYERS)
    with pytest.raises(NotInStoreError, match=r"matches no module of .*: 0\.self_attn, .*\.\.\. \(11 in all\)"):
        catalog.select("decoder.*")


def test_refresh_makes_a_new_catalogue(store):
    before = store.catalog
    store.refresh()
    assert store.catalog is not before and store.catalog.steps == before.steps
