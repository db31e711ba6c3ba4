"""The Lightning callback on a tiny causal ``nn.TransformerEncoder``: steps 0, N, 2N, ... with one call per
accumulated micro-batch, validation runs (not the sanity check) in their own store, losses and weights
bit-equal to a run without the callback, metrics in the TensorBoardLogger's event files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnhooks
from attnhooks.errors import ModuleSelectionError

pl = pytest.importorskip(
    "pytorch_lightning", reason="the Lightning callback needs pytorch-lightning (attnhooks[lightning])"
)
pytest.importorskip("tensorboard", reason="the TensorBoard read-back needs tensorboard (attnhooks[tensorboard])")
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from attnhooks.integrations.lightning import AttnHooksCallback  # noqa: E402
from tests.integration.test_callbacks_hf import tensorboard_events  # noqa: E402

VOCAB, SEQ = 20, 8


class TinyLM(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)
        self.losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.encoder(self.embed(ids), mask=mask, is_causal=True))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self(batch[:, :-1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(root: Path, name: str, callbacks: list[pl.Callback]) -> tuple[TinyLM, TensorBoardLogger]:
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (48, SEQ + 1), generator=torch.Generator().manual_seed(0))
    model, logger = TinyLM(), TensorBoardLogger(str(root), name=name)
    trainer = pl.Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        callbacks=callbacks,
        logger=logger,
        val_check_interval=4,  # batches: validation after optimizer steps 2 and 4
        limit_val_batches=2,
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer.fit(model, loader, torch.utils.data.DataLoader(data[:8], batch_size=4))
    return model, logger


def test_lightning_callback_steps_calls_eval_apart_bit_equal_and_tensorboard(tmp_path: Path) -> None:
    cb = AttnHooksCallback(
        every=2, store=tmp_path / "t.zarr", evaluation=True, eval_store=tmp_path / "e.zarr", figures=1
    )
    model_cb, logger = fit(tmp_path, "with", [cb])
    model_bare, _ = fit(tmp_path, "bare", [])
    assert model_cb.losses == model_bare.losses and len(model_bare.losses) == 10
    for (name, a), b in zip(model_cb.state_dict().items(), model_bare.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    st = attnhooks.open_store(tmp_path / "t.zarr")
    assert st.steps == [0, 2, 4] and st.modules == [f"encoder.layers.{i}.self_attn" for i in (0, 1)]
    assert {st.calls(m, s) for m in st.modules for s in st.steps} == {2}
    ev = attnhooks.open_store(tmp_path / "e.zarr")
    assert ev.steps == [2, 4] and {ev.calls(m, s) for m in ev.modules for s in ev.steps} == {2}
    phases = [("train", 0), ("eval", 2), ("train", 2), ("eval", 4), ("train", 4)]
    assert [(h.phase, h.step) for h in cb.history] == phases

    scalars, images = tensorboard_events(Path(logger.log_dir))
    want = [h.values["previous"][1, 0] for h in cb.history if h.phase == "train"]
    assert [s for s, _ in scalars["attnhooks/previous/L1H0"]] == [0, 2, 4]
    np.testing.assert_allclose([v for _, v in scalars["attnhooks/previous/L1H0"]], want, rtol=1e-6)
    assert [s for s, _ in scalars["attnhooks_eval/entropy/L0H1"]] == [2, 4]
    assert images["attnhooks/grid"] == [0, 2, 4]


def test_lightning_callback_refuses_an_unknown_attribute_and_module_before_step_0(tmp_path: Path) -> None:
    for bad, error in (({"attribute": "model"}, "children"), ({"modules": "encoder.layer.*"}, "matches no module")):
        cb = AttnHooksCallback(every=2, **bad)  # type: ignore[arg-type]
        with pytest.raises(ModuleSelectionError, match=error):
            fit(tmp_path, "bad", [cb])
        assert cb.history == []


def test_lightning_callback_wandb_logger_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb", reason="the W&B test needs wandb (attnhooks[wandb])")
    from pytorch_lightning.loggers import WandbLogger

    from tests.integration.test_callbacks_hf import wandb_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (16, SEQ + 1), generator=torch.Generator().manual_seed(0))
    cb = AttnHooksCallback(every=2, metrics=("previous",), figures=True)
    logger = WandbLogger(project="attnhooks-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[cb],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    try:
        trainer.fit(TinyLM(), torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        wandb.finish()
    rows = [r for r in wandb_history(tmp_path) if "attnhooks/previous/L0H0" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2]
    np.testing.assert_allclose(
        [r["attnhooks/previous/L1H1"] for r in rows], [h.values["previous"][1, 1] for h in cb.history]
    )
    assert all(r["attnhooks/grid/_type"] == "image-file" for r in rows)
