"""The Hugging Face Trainer callback on a tiny GPT-2: the store holds steps 0, N, 2N, ... with one call
per micro-batch, evaluations apart, losses and weights bit-equal to a run without the callback; the
metrics are in TensorBoard's event files and in an offline W&B run; bad options fail before step 0."""

from __future__ import annotations

import glob
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.errors import ModuleSelectionError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard", reason="the TensorBoard read-back needs tensorboard (attnhooks[tensorboard])")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from attnhooks.integrations.hf import AttnHooksCallback  # noqa: E402

SEQ, VOCAB = 16, 40


class Repeats(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random first halves repeated: every sequence has something for an induction head to find."""

    def __init__(self, n: int, seed: int) -> None:
        half = torch.randint(0, VOCAB, (n, SEQ // 2), generator=torch.Generator().manual_seed(seed))
        self.ids = torch.cat([half, half], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, **no_dropout)
    return GPT2LMHeadModel(cfg)


def train(out: Path, callbacks: list[Any], report: list[str], **extra: Any) -> tuple[Trainer, GPT2LMHeadModel]:
    model = tiny_gpt2()
    settings: dict[str, Any] = {
        "eval_strategy": "steps",
        "eval_steps": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 5,
        **extra,
    }
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=1,
        report_to=report,
        seed=0,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **settings,
    )
    trainer = Trainer(model, args, train_dataset=Repeats(48, 0), eval_dataset=Repeats(8, 1), callbacks=callbacks)
    trainer.train()
    return trainer, model


def losses(trainer: Trainer) -> list[tuple[int, str, float]]:
    return [(h["step"], k, h[k]) for h in trainer.state.log_history for k in ("loss", "eval_loss") if k in h]


def tensorboard_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """Scalars ``tag -> [(step, value)]`` and images ``tag -> [step]`` read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images


def wandb_history(root: Path) -> list[dict[str, Any]]:
    """The history rows of the offline W&B run under ``root``: its ``.wandb`` file is a LevelDB-style log
    (7-byte W&B header, 32 KiB blocks, chunks ``crc32 | length | type``) of ``Record`` protobufs."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    rows, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_trainer_callback_store_steps_calls_eval_apart_and_bit_equal(tmp_path: Path) -> None:
    cb = AttnHooksCallback(
        every=2, store=tmp_path / "train.zarr", evaluation=True, eval_store=tmp_path / "eval.zarr", figures=True
    )
    with_cb, model_cb = train(tmp_path / "a", [cb], ["tensorboard"])
    bare, model_bare = train(tmp_path / "b", [], [])

    # 5 training losses, the evaluations at steps 2 and 4, and (transformers >= 5.1; not 4.57 or 5.0) one at the end
    assert losses(with_cb) == losses(bare) and len(losses(bare)) in (7, 8)
    evals = [step for step, name, _ in losses(bare) if name == "eval_loss"]  # the Trainer's own evaluations
    assert evals in ([2, 4], [2, 4, 5])
    for (name, a), b in zip(model_cb.state_dict().items(), model_bare.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    st = attnhooks.open_store(tmp_path / "train.zarr")
    assert st.steps == [0, 2, 4] and st.modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert {st.calls(m, s) for m in st.modules for s in st.steps} == {2}  # 2 micro-batches per optimizer step
    ev = attnhooks.open_store(tmp_path / "eval.zarr")
    assert ev.steps == evals and {ev.calls(m, s) for m in ev.modules for s in ev.steps} == {2}  # 8 rows / 4
    assert st.attention(st.modules[0], step=4, call=1).shape == (2, SEQ, SEQ)

    phases = [("train", 0), ("eval", 2), ("train", 2), ("eval", 4), ("train", 4), ("eval", 5)][: 3 + len(evals)]
    assert [(h.phase, h.step) for h in cb.history] == phases  # an evaluation runs after its step's update
    scalars, images = tensorboard_events(tmp_path / "a" / "runs" / "attnhooks")
    for metric in ("entropy", "sink", "previous", "induction", "distance"):
        for layer in (0, 1):
            for head in (0, 1):
                tag = f"attnhooks/{metric}/L{layer}H{head}"
                assert [s for s, _ in scalars[tag]] == [0, 2, 4]
                want = [h.values[metric][layer, head] for h in cb.history if h.phase == "train"]
                np.testing.assert_allclose([v for _, v in scalars[tag]], want, rtol=1e-6)
                assert [s for s, _ in scalars[f"attnhooks_eval/{metric}/L{layer}H{head}"]] == evals
    assert images["attnhooks/grid"] == [0, 2, 4] and images["attnhooks_eval/grid"] == evals


def test_trainer_callback_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb", reason="the W&B test needs wandb (attnhooks[wandb])")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_PROJECT", "attnhooks-test")
    cb = AttnHooksCallback(every=2, metrics=("induction", "entropy"), figures=2)  # figures at steps 0 and 4
    try:
        train(tmp_path / "w", [cb], ["wandb"], eval_strategy="no")
    finally:
        wandb.finish()
    deadline = time.monotonic() + 30
    while True:  # W&B's service process writes the offline run file; under load it can lag finish()
        rows = [r for r in wandb_history(tmp_path) if "attnhooks/induction/L0H0" in r]
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r["train/global_step"] for r in rows] == [0, 2, 4]
    want = [h.values["induction"][1, 0] for h in cb.history]
    np.testing.assert_allclose([r["attnhooks/induction/L1H0"] for r in rows], want, rtol=1e-6)
    assert [r.get("attnhooks/grid/_type") for r in rows] == ["image-file", None, "image-file"]
    media = tmp_path / "wandb" / "offline-run-*" / "files" / "media"
    assert len(glob.glob(str(media / "**" / "*.png"), recursive=True)) == 2


def test_trainer_callback_refuses_an_unknown_module_before_step_0(tmp_path: Path) -> None:
    cb = AttnHooksCallback(every=2, store=tmp_path / "run.zarr", modules="transformer.h.*.attention")
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=Repeats(8, 0), callbacks=[cb])
    with pytest.raises(ModuleSelectionError, match=r"transformer\.h\.0\.attn"):
        trainer.train()
    assert trainer.state.global_step == 0 and not os.path.exists(tmp_path / "run.zarr")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_callback_close_after_a_failed_step_leaves_no_hook_and_keeps_the_finished_calls(
    tmp_path: Path,
) -> None:
    cb = AttnHooksCallback(every=1, store=tmp_path / "run.zarr", metrics=())
    model = tiny_gpt2()
    forward, calls = model.forward, []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:  # the second micro-batch of step 1
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    model.forward = failing  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,  # the wrapper's signature names no column
    )
    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(model, args, train_dataset=Repeats(24, 0), callbacks=[cb]).train()
    cb.close()  # the Trainer calls no callback after an exception; the leak guard checks every hook is gone
    del model.forward
    st = attnhooks.open_store(tmp_path / "run.zarr")
    # each finished forward is committed as it ends: step 1 keeps its first micro-batch, not the failed one
    assert st.steps == [0, 1] and [st.calls("transformer.h.0.attn", s) for s in st.steps] == [2, 1]
