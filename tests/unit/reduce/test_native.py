"""The C summary kernel's build: cached per source, compiler, flags and CPU; torch when it cannot be."""

from __future__ import annotations

import subprocess
from unittest import mock

import pytest
import torch

from attnhooks.attention.masks import MaskSpec
from attnhooks.reduce import native
from attnhooks.reduce.summary import SummaryOptions, summarize_call


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no loaded kernel; the suite's kernel is restored afterwards."""
    monkeypatch.setenv("ATTNHOOKS_CACHE", str(tmp_path))
    monkeypatch.delenv("ATTNHOOKS_NATIVE", raising=False)
    with mock.patch.dict(native._state, clear=True):
        yield tmp_path


def _needs_compiler():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")


def test_built_once_then_loaded_from_the_cache(fresh):
    _needs_compiler()
    assert native.status().startswith("native (summary-")
    built = sorted(p.name for p in fresh.iterdir())
    assert len(built) == 1 and not built[0].startswith(".build-")
    native._state.clear()
    with mock.patch.object(subprocess, "run", wraps=subprocess.run) as run:
        assert native.summary_kernel() is not None
    assert not any("-shared" in call.args[0] for call in run.call_args_list), "compiled again"
    assert sorted(p.name for p in fresh.iterdir()) == built


def test_another_cpu_gets_its_own_build(fresh):
    _needs_compiler()
    native.summary_kernel()
    native._state.clear()
    with mock.patch.object(native, "_cpu", lambda: "flags: none at all"):
        native.summary_kernel()
    assert len(list(fresh.iterdir())) == 2


def test_a_folder_others_may_write_is_not_used(fresh):
    """A shared folder could hold somebody else's library under the expected name."""
    _needs_compiler()
    fresh.chmod(0o777)
    assert native.summary_kernel() is None
    assert "no writable cache folder that only this user can write" in native.status()
    assert not list(fresh.iterdir())


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("ATTNHOOKS_NATIVE", "0")
    assert native.summary_kernel() is None
    assert native.status() == "torch (ATTNHOOKS_NATIVE=0)"
    assert not list(fresh.iterdir())


def test_no_compiler_falls_back_to_torch(fresh):
    with mock.patch.object(native, "_compiler", lambda: None):
        assert native.summary_kernel() is None
        assert "no C compiler" in native.status()


def test_a_failing_compiler_falls_back_to_torch_and_says_why(fresh, tmp_path_factory):
    fake = tmp_path_factory.mktemp("bin") / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'fatal: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    with mock.patch.object(native, "_compiler", lambda: [str(fake)]):
        assert native.summary_kernel() is None
        assert "did not build" in native.status() and "fatal: no" in native.status()
    assert not [p for p in fresh.iterdir() if p.name.startswith(".build-")], "a failed build left a file"


def test_both_paths_agree_on_a_long_peaked_causal_call():
    """The kernel against torch's path on a 2k-token call with rows far below the exp floor,
    NaN-free outputs, and the same top keys."""
    if native.summary_kernel() is None:
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 2048, 32, generator=g), torch.randn(1, 2, 2048, 32, generator=g)
    k[:, :, 0] = 30 * q[:, :2].mean(2)  # a sink every row attends to: the rest falls below e^-87
    from attnhooks.attention.kernels import row_lse

    lse = row_lse(q, k, 32**-0.5, MaskSpec(causal=True))
    args = dict(scale=32**-0.5, mask=MaskSpec(causal=True), options=SummaryOptions())
    got = summarize_call(q, k, lse, **args)
    with mock.patch.object(native, "summary_kernel", lambda: None):
        want = summarize_call(q, k, lse, **args)
    for name, value in want.items():
        assert not got[name].double().isnan().any(), name
        if name == "topk_index":
            assert (got[name] == value).float().mean() > 0.99  # ties may pick another key
        else:
            assert float((got[name].double() - value.double()).abs().max()) <= 1e-5, name
