"""The dynamics view: the same metric per layer x head across steps from the three sources (a store read
back, the callback's history, the TensorBoard scalars it logged), and ``attnhooks view ... dynamics``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import attnhooks
from attnhooks.cli.main import main
from attnhooks.errors import ViewError

pytest.importorskip("transformers")
pytest.importorskip("tensorboard", reason="the TensorBoard source needs tensorboard (attnhooks[tensorboard])")

from attnhooks.integrations.hf import AttnHooksCallback
from attnhooks.viewer.dynamics import (
    Dynamics,
    dynamics_from_history,
    dynamics_from_store,
    dynamics_from_tensorboard,
    dynamics_view,
)
from tests.integration.test_callbacks_hf import train


def test_dynamics_from_store_history_and_tensorboard_agree_and_the_cli_draws_them(tmp_path: Path) -> None:
    cb = AttnHooksCallback(every=2, store=tmp_path / "run.zarr")
    train(tmp_path / "out", [cb], ["tensorboard"], gradient_accumulation_steps=1, max_steps=7, eval_strategy="no")
    st = attnhooks.open_store(tmp_path / "run.zarr")
    for metric in ("induction", "entropy", "previous"):
        logged = dynamics_from_history(cb.history, metric)
        stored = dynamics_from_store(st, metric)
        board = dynamics_from_tensorboard(tmp_path / "out" / "runs", metric)
        assert list(logged.steps) == list(stored.steps) == list(board.steps) == [0, 2, 4, 6]
        assert stored.layers == logged.layers == ["transformer.h.0.attn", "transformer.h.1.attn"]
        assert stored.values.shape == (4, 2, 2) and np.isfinite(stored.values).all()
        np.testing.assert_allclose(stored.values, logged.values, rtol=1e-5, atol=1e-7)  # read back vs in memory
        np.testing.assert_allclose(board.values, logged.values, rtol=1e-6)  # float32 scalars
    assert board.loss is not None and list(board.loss[0]) == list(range(1, 8))

    for source in (tmp_path / "run.zarr", tmp_path / "out" / "runs"):
        out = tmp_path / f"{source.name}.png"
        assert main(["view", str(source), "dynamics", "--metric", "induction", "-o", str(out)]) == 0
        assert out.stat().st_size > 10_000
    assert main(["view", str(tmp_path / "run.zarr"), "dynamics", "--metric", "nope", "-o", str(out)]) != 0
    with pytest.raises(ViewError, match="no eval step"):
        dynamics_from_history(cb.history, "induction", phase="eval")


def test_dynamics_strongest_and_view() -> None:
    values = np.zeros((3, 2, 3))
    values[:, 1, 2] = [0.0, 0.5, 0.9]  # layer 1 head 2 rises
    values[:, 0, 0] = [0.2, 0.3, 0.4]
    d = Dynamics("induction", np.array([0, 10, 20]), ["a", "b"], values)
    assert d.strongest(2) == [(1, 2), (0, 0)]
    fig = dynamics_view(d)
    assert len(fig.axes) >= 3  # a panel per layer, the heatmap (and its colour bar)
