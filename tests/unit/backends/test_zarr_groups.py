"""A group made with its attributes (``create_group_with``): what create_group then set_attrs make, in
one write of a new group's ``zarr.json``."""

from __future__ import annotations

import json

import pytest
import torch

import attnhooks
from attnhooks.backends import zarrplace
from attnhooks.backends.memory import MemoryBackend
from attnhooks.backends.zarrstore import ZarrBackend
from attnhooks.schema import module_path
from attnhooks.write.attrs import open_module

ATTRS = {"name": "layers.0.attn", "heads": 4, "columns": ["batch", "q_len"], "window": None}


@pytest.fixture
def writes(monkeypatch):
    made: list[str] = []
    real = zarrplace.write_atomically

    def counting(target, parts):
        made.append(target)
        real(target, parts)

    monkeypatch.setattr(zarrplace, "write_atomically", counting)
    return made


def test_a_new_group_is_one_write_of_its_metadata(tmp_path, writes):
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    be.create_group("modules")
    writes.clear()
    be.create_group_with("modules/a", ATTRS)
    assert [w.rsplit("/", 2)[-2] for w in writes] == ["a"]
    be.create_group("modules/b")
    be.set_attrs("modules/b", ATTRS)
    assert be.attrs("modules/a") == be.attrs("modules/b") == ATTRS
    meta = [json.loads((tmp_path / "s.zarr" / "modules" / n / "zarr.json").read_text()) for n in "ab"]
    assert meta[0] == meta[1]
    be.close()


def test_parents_are_made_and_an_existing_group_keeps_its_other_attributes(tmp_path, writes):
    be = ZarrBackend.open(str(tmp_path / "s.zarr"), "w", {"schema": "x"})
    be.create_group_with("modules/deep/a", {"old": 1, "heads": 2})
    assert be.contains("modules/deep") and be.attrs("modules/deep") == {}
    be.create_group_with("modules/deep/a", ATTRS)
    assert be.attrs("modules/deep/a") == {"old": 1, **ATTRS}
    be.close()
    with pytest.raises(PermissionError):
        ZarrBackend.open(str(tmp_path / "s.zarr"), "r").create_group_with("modules/deep/a", ATTRS)


def test_the_writer_makes_module_groups_with_or_without_the_method(tmp_path, writes):
    """open_module uses create_group_with where a backend has it, create_group and set_attrs where not."""
    layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 3, 8)
    with attnhooks.capture(layer, record=("q", "k"), store=tmp_path / "s.zarr"):
        layer(x, x, x)
    with attnhooks.capture(layer, record=("q", "k")) as mem:
        layer(x, x, x)
    rec = mem.records[0]
    group = module_path(rec.module)
    assert [w for w in writes if w.endswith(f"/{group}/zarr.json")] == [str(tmp_path / "s.zarr" / group / "zarr.json")]
    assert not hasattr(MemoryBackend, "create_group_with")
    memory = MemoryBackend.open("memory://groups", "w", {"schema": "x"})
    attrs = open_module(memory, rec, "float32", frozenset())
    assert memory.attrs(group) == attrs and attrs["heads"] == 2
    with attnhooks.open_store(tmp_path / "s.zarr") as st:
        assert st.backend.attrs(group) == attrs


def test_metadata_written_here_is_compact_json_that_zarr_reads(tmp_path):
    """Nodes' zarr.json written by attnhooks itself have no indentation (Python's own JSON encoder, ~9x
    slower, is the only one that indents) and read back through zarr as they were written."""
    import zarr

    layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 3, 8)
    store = tmp_path / "s.zarr"
    with attnhooks.capture(layer, record=("q", "k"), store=store):
        layer(x, x, x)
        layer(x, x, x)
    group = module_path("")
    for node in ("", "stacks", group):
        text = (store / node / "zarr.json").read_text()
        assert "\n" not in text.strip(), node
    with attnhooks.open_store(store) as st:
        ours = st.backend.attrs("stacks")
    assert dict(zarr.open_group(str(store), mode="r")["stacks"].attrs) == ours
    assert ours["attnhooks_stack"], "the stacks' description"
