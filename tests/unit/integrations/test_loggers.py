"""The metric sinks without a trainer: accelerate's trackers (``accelerator.log``), a SummaryWriter, a
function; the grid figure's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnhooks.integrations.core import sink_for
from attnhooks.integrations.loggers import AccelerateSink, CallableSink, TensorBoardSink, grid_image
from attnhooks.integrations.metrics import StepMetrics

pytest.importorskip("tensorboard", reason="the read-back needs tensorboard (attnhooks[tensorboard])")


def metrics(step: int) -> StepMetrics:
    grid = np.arange(6, dtype=np.float64).reshape(2, 3) / 10 + step
    return StepMetrics(step, "train", ["a", "b"], {"induction": grid, "sink": 1 - grid})


def read(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    scalars: dict[str, list[tuple[int, float]]] = {}
    images: list[str] = []
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        images += acc.Tags()["images"]
    return scalars, images


def test_accelerate_trackers_get_the_scalars_and_the_figure(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(log_with="tensorboard", project_dir=str(tmp_path), cpu=True)
    accelerator.init_trackers("run")
    sink = sink_for(accelerator)
    assert isinstance(sink, AccelerateSink)
    sink.log(metrics(0), True)
    sink.log(metrics(10), False)
    accelerator.end_training()
    scalars, images = read(tmp_path)
    assert [s for s, _ in scalars["attnhooks/induction/L1H2"]] == [0, 10]
    np.testing.assert_allclose([v for _, v in scalars["attnhooks/sink/L0H1"]], [0.9, -9.1], rtol=1e-6)
    assert images == ["attnhooks/grid"]


def test_summary_writer_and_function_sinks(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    assert isinstance(sink_for(writer), TensorBoardSink)
    sink_for(writer).log(metrics(3), True)
    writer.close()
    scalars, images = read(tmp_path)
    assert len(scalars) == 12 and scalars["attnhooks/induction/L0H0"] == [(3, pytest.approx(3.0))]
    assert images == ["attnhooks/grid"]
    seen: list[StepMetrics] = []
    function_sink = sink_for(seen.append)
    assert isinstance(function_sink, CallableSink)
    function_sink.log(metrics(1), False)
    assert [m.step for m in seen] == [1]
    image = grid_image(metrics(2))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
