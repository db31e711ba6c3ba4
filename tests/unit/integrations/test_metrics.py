"""The callbacks' per-head metrics: the analysis functions' numbers, averaged over sequences and calls;
padding cropped away; options refused before training with typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnhooks import analysis
from attnhooks.analysis.heads import HEAD_METRICS, check_metrics, sequence_metrics
from attnhooks.capturing.record import Record
from attnhooks.errors import AnalysisError, RecordOptionError, StoreExistsError
from attnhooks.integrations.core import CallbackCore
from attnhooks.integrations.metrics import Forward, StepMetrics, step_metrics


def _causal(batch: int, heads: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n, n, generator=g)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def test_sequence_metrics_are_the_analysis_functions() -> None:
    attn = _causal(1, 3, 8, 0)[0].numpy()
    tokens = np.array([4, 5, 6, 7, 4, 5, 6, 7])
    got = sequence_metrics(attn, HEAD_METRICS, tokens)
    np.testing.assert_array_equal(got["entropy"], analysis.entropy(attn).mean(-1))
    np.testing.assert_array_equal(got["sink"], analysis.sink_mass(attn).mean(-1))
    np.testing.assert_array_equal(got["previous"], analysis.previous_token_score(attn))
    np.testing.assert_array_equal(got["induction"], analysis.induction_score(attn, tokens))
    np.testing.assert_array_equal(got["distance"], analysis.attention_distance(attn).mean(-1))
    assert np.isnan(sequence_metrics(attn, ("induction",))["induction"]).all()  # no tokens: nothing to score


def test_step_metrics_average_sequences_and_calls_and_crop_padding() -> None:
    a0, a1 = _causal(2, 2, 6, 1), _causal(2, 2, 6, 2)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3], [9, 8, 7, 9, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # sequence 1 of call 1: 5 real tokens
    records = [
        Record("layer.0", 0, 4, attn=a0),
        Record("layer.1", 0, 4, attn=a0.flip(1)),
        Record("layer.0", 1, 4, attn=a1),
        Record("layer.1", 1, 4, attn=a1.flip(1)),
    ]
    forwards = [Forward(0, ids.numpy(), None), Forward(2, ids.numpy(), mask.numpy())]
    out = step_metrics(records, forwards, ("induction", "entropy"), step=4, phase="train")
    assert out.modules == ["layer.0", "layer.1"] and out.values["entropy"].shape == (2, 2)
    crop = a1[1, :, :5, :5].numpy()
    seqs = [(a0[0].numpy(), ids[0]), (a0[1].numpy(), ids[1]), (a1[0].numpy(), ids[0]), (crop, ids[1, :5])]
    want = np.mean([analysis.induction_score(s, t.numpy()) for s, t in seqs], axis=0)
    np.testing.assert_allclose(out.values["induction"][0], want, rtol=1e-12)
    want_h = np.mean([analysis.entropy(s).mean(-1) for s, _ in seqs], axis=0)
    np.testing.assert_allclose(out.values["entropy"][0], want_h, rtol=1e-12)
    scalars = out.scalars("attnhooks")
    assert scalars["attnhooks/induction/L0H1"] == pytest.approx(want[1]) and len(scalars) == 8


def test_step_metrics_samples_limit_and_nan_for_nothing_to_score() -> None:
    a = _causal(3, 2, 4, 3)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 1, 2], [5, 6, 7, 8]])
    out = step_metrics([Record("m", 0, 0, attn=a)], [Forward(0, ids.numpy())], ("induction",), 0, "train", samples=1)
    assert np.isnan(out.values["induction"]).all()  # sequence 0 repeats no token
    out = step_metrics([Record("m", 0, 0, attn=a)], [Forward(0, ids.numpy())], ("induction",), 0, "train")
    np.testing.assert_allclose(out.values["induction"][0], analysis.induction_score(a[1].numpy(), ids[1].numpy()))
    assert StepMetrics(0, "train", [], {}).scalars("x") == {}


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"every": 0}, RecordOptionError, "every=0"),
        ({"every": -3}, RecordOptionError, "positive int"),
        ({"metrics": ("induction", "nope")}, RecordOptionError, "'nope'"),
        ({"record": ("q", "k"), "store": "memory://x"}, RecordOptionError, "add 'attn'"),
        ({"eval_store": "memory://e"}, RecordOptionError, "evaluation=True"),
        ({"samples": 0}, RecordOptionError, "samples=0"),
        ({"figures": -1}, RecordOptionError, "figures=-1"),
        ({"loggers": "tensorboard"}, RecordOptionError, "loggers="),
        ({"loggers": [3]}, RecordOptionError, "SummaryWriter"),
        ({"capture": {"store": "x"}}, RecordOptionError, "callback's own"),
    ],
)
def test_options_refused_when_the_callback_is_made(kwargs: dict, error: type, text: str) -> None:
    args = {"every": 2, **kwargs}
    with pytest.raises(error, match=text):
        CallbackCore(**args)


def test_existing_store_refused_at_once(tmp_path) -> None:
    (tmp_path / "run.zarr").mkdir()
    with pytest.raises(StoreExistsError, match="mode='overwrite'"):
        CallbackCore(3, store=tmp_path / "run.zarr")
    CallbackCore(3, store=tmp_path / "run.zarr", mode="append")  # appending to it is fine


def test_check_metrics() -> None:
    assert check_metrics("entropy") == ("entropy",)
    with pytest.raises(AnalysisError, match="repeated"):
        check_metrics(("sink", "sink"))
