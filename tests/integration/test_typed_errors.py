"""Typed errors where builtin ones escaped, and options that were taken without effect (issue 18,
the WEAK cases of its probe): each is refused with a reason naming the valid range or the fix."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import attnhooks
from attnhooks.cli import main


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()


@pytest.fixture(scope="module")
def store(layer, tmp_path_factory):
    path = tmp_path_factory.mktemp("typed") / "run.zarr"
    with torch.no_grad(), attnhooks.capture(layer, store=path, record=("attn", "q", "k", "lse")):
        layer(torch.randn(1, 3, 8))
    return attnhooks.open_store(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"heads": 4}, IndexError, r"valid: 0\.\.1"),
        ({"heads": "all"}, IndexError, r"None for all 2 heads"),
        ({"heads": [[0, 1]]}, IndexError, r"flat list"),
        ({"rows": [1, 5]}, IndexError, r"valid: 0\.\.2"),
        ({"rows": slice(5, 2)}, IndexError, r"backwards"),
        ({"cols": [0]}, IndexError, r"contiguous slice"),
        ({"method": "bogus"}, ValueError, r"auto"),
    ],
)
def test_reader_arguments_out_of_range_are_typed(store, kwargs, error, says):
    with pytest.raises(attnhooks.AttnHooksError, match=says) as err:
        store.attention(store.modules[0], **kwargs)
    assert isinstance(err.value, error)


@pytest.mark.parametrize("location", [None, 42, 3.5])
def test_open_store_of_no_location_is_typed(location):
    with pytest.raises(attnhooks.StoreOptionError, match=r"path ending in \.zarr"):
        attnhooks.open_store(location)


def test_a_module_selection_that_is_no_name_is_typed(store):
    with pytest.raises(attnhooks.NotInStoreError, match="holds self_attn"):
        store.select(42)


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"mode": "append"}, attnhooks.StoreOptionError, "no store= was given"),
        ({"buffer": "1MiB"}, attnhooks.StoreOptionError, "no store= was given"),
        ({"compression": "gzip"}, attnhooks.StoreOptionError, "no store= was given"),
        ({"tokenizer": "bert-base-uncased"}, attnhooks.RecordOptionError, "AutoTokenizer.from_pretrained"),
        ({"rows": slice(5, 2)}, attnhooks.RecordOptionError, "selects no row"),
        ({"modules": 42}, attnhooks.ModuleSelectionError, "module name or glob"),
    ],
)
def test_capture_options_that_would_be_ignored_are_refused(layer, kwargs, error, says):
    with pytest.raises(error, match=says):
        attnhooks.capture(layer, **kwargs)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_full_disk_at_creation_is_store_full_and_leaves_nothing(tmp_path, layer, suffix, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if suffix == ".zarr":
        import zarr

        real = zarr.open_group

        def half_then_full(path, *args, **kwargs):
            real(path, *args, **kwargs)  # the folder exists, then the device fills up
            full()

        monkeypatch.setattr("attnhooks.backends.zarrstore.zarr.open_group", half_then_full)
    else:
        monkeypatch.setattr("attnhooks.backends.hdf5.write_attrs", full)  # the file exists, its attributes fail
    path = tmp_path / f"run{suffix}"
    with pytest.raises(attnhooks.StoreFullError, match="full"):
        with attnhooks.capture(layer, store=path):
            pass
    assert sorted(os.listdir(tmp_path)) == [], "no store, no .creating-* file, no lease"


def test_cli_messages_name_the_cli_flag_and_the_valid_range(tmp_path, capsys):
    out = str(tmp_path / "c.zarr")
    args = ["capture", "--model", "all-MiniLM-L6-v2", "--prompt", "hi there", "--out", out, "--no-progress"]
    assert main(args) == 0
    assert main(args) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["capture", "--model", "./no-such-model", "--prompt", "x", "--out", str(tmp_path / "d.zarr")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["view", out, "qk", "--query", "99", "-o", str(tmp_path / "x.png")]) == 1
    assert "valid: 0..3" in capsys.readouterr().err  # "hi there": [CLS] hi there [SEP]
    assert main(["view", out, "compare", "-o", str(tmp_path / "y.png")]) == 1
    assert "--against" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
