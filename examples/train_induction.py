"""Watch induction heads form: a 2-layer Llama trained with the Hugging Face ``Trainer`` on repeated
random tokens, attnhooks' callback measuring every head's induction score every N steps.

    python examples/train_induction.py --out induction-run            # ~2-3 minutes on 2 CPU cores
    python examples/train_induction.py --out induction-run --overhead  # also: bare vs callback, timed

Every sequence is random tokens in which a span is repeated right after itself, at a distance that
changes from sequence to sequence. Random tokens cannot be predicted; the repeated copy can, once a
head attends from each token to the token that followed its earlier copy (an induction head, Olsson
et al. 2022), helped by a head of the layer below that attends to the previous token. The loss then
falls within a few dozen steps from its plateau at ~ln(vocab): the phase change.

The callback captures one optimizer step in ``--every`` (no store: metrics only, computed from the
captured attention in memory) and logs every head's ``induction``, ``previous`` and ``entropy`` to
TensorBoard (``OUT/runs/attnhooks``). This script draws the dynamics view of the induction score with
the loss (``OUT/induction.png``); ``attnhooks view OUT/runs dynamics --metric induction -o x.png``
draws it from the TensorBoard logs.

``--overhead`` then times shorter runs, interleaved: without the callback and with it (metrics only,
no store, ``--every`` steps), both logging to TensorBoard; it prints the best time of each, their
ratio, and whether the losses are identical (they are: capturing only reads).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from attnhooks.integrations.hf import AttnHooksCallback
from attnhooks.viewer.dynamics import dynamics_from_history, dynamics_view

VOCAB = 64
LENGTH = 48  # tokens per sequence


class RepeatedSpans(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``n`` sequences: a random prefix of 0 to 16 tokens, then a span of random tokens twice (the span
    fills the rest, 16 to 24 tokens). The distance between the copies changes from sequence to
    sequence, so no head can find the earlier copy by position alone: predicting the second copy needs
    an induction head. A fixed seed: the same data in every run."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        prefixes = torch.randint(0, 17, (n,), generator=g)
        for i, prefix in enumerate(prefixes.tolist()):
            span = (LENGTH - prefix) // 2
            self.ids[i, prefix + span : prefix + 2 * span] = self.ids[i, prefix : prefix + span]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> LlamaForCausalLM:
    """A 2-layer, 4-head Llama (RoPE, 64 wide): small enough for a few minutes on 2 CPU cores."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def train(out: Path, steps: int, callbacks: list[Any], report: list[str]) -> tuple[Trainer, float]:
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=steps,
        logging_steps=5,
        report_to=report,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model(), args, train_dataset=RepeatedSpans(32 * steps), callbacks=callbacks)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    trainer.cpu_seconds = time.process_time() - cpu  # type: ignore[attr-defined]
    return trainer, time.perf_counter() - start


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def overhead(out: Path, steps: int, every: int, repeats: int) -> dict[str, Any]:
    """Interleaved timed runs, bare then with the callback (metrics only, no store, the default figure
    cadence), both logging to TensorBoard: wall and CPU seconds of each (the CPU time of this process
    is less disturbed by other work on a shared machine), the ratios of the best, identical losses."""
    wall: dict[str, list[float]] = {"bare": [], "callback": []}
    cpu: dict[str, list[float]] = {"bare": [], "callback": []}
    identical = True
    for r in range(repeats):
        bare, seconds = train(out / f"bare{r}", steps, [], ["tensorboard"])
        wall["bare"].append(seconds)
        cpu["bare"].append(bare.cpu_seconds)  # type: ignore[attr-defined]
        callback = AttnHooksCallback(every=every, metrics=("induction", "previous", "entropy"), samples=8)
        with_callback, seconds = train(out / f"callback{r}", steps, [callback], ["tensorboard"])
        wall["callback"].append(seconds)
        cpu["callback"].append(with_callback.cpu_seconds)  # type: ignore[attr-defined]
        identical = identical and losses(bare) == losses(with_callback)
    return {
        "steps": steps,
        "every": every,
        "wall_s": {k: [round(t, 2) for t in v] for k, v in wall.items()},
        "cpu_s": {k: [round(t, 2) for t in v] for k, v in cpu.items()},
        "wall_ratio_of_best": round(min(wall["callback"]) / min(wall["bare"]), 3),
        "cpu_ratio_of_best": round(min(cpu["callback"]) / min(cpu["bare"]), 3),
        "losses_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("induction-run"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--store", help="also stream the captured steps (attn, q, k) to this store")
    parser.add_argument("--overhead", action="store_true", help="also time runs with and without the callback")
    parser.add_argument("--overhead-steps", type=int, default=200, help="steps of each timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs (bare, callback), interleaved")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(args.out / "runs"))

    metrics = ("induction", "previous", "entropy")
    callback = AttnHooksCallback(every=args.every, store=args.store, metrics=metrics, samples=8)
    trainer, seconds = train(args.out, args.steps, [callback], ["tensorboard"])
    dynamics = dynamics_from_history(callback.history, "induction")
    curve = losses(trainer)
    dynamics.loss = (torch.tensor([s for s, _ in curve]).numpy(), torch.tensor([v for _, v in curve]).double().numpy())
    fig = dynamics_view(dynamics, figsize=(8.0, 5.2))
    fig.suptitle("2-layer Llama on repeated random spans: induction score per head (loss in red)", fontsize=9)
    fig.savefig(args.out / "induction.png", dpi=90)
    (layer, head), *_ = dynamics.strongest(1)
    score = dynamics.values[:, layer, head]
    summary: dict[str, Any] = {
        "steps": args.steps,
        "every": args.every,
        "seconds_with_callback": round(seconds, 2),
        "strongest_induction_head": f"L{layer}H{head}",
        "induction_first_last": [round(float(score[0]), 3), round(float(score[-1]), 3)],
        "loss_first_last": [curve[0][1], curve[-1][1]],
        "figure": str(args.out / "induction.png"),
    }
    if args.overhead:
        summary["overhead"] = overhead(args.out, args.overhead_steps, args.every, args.repeats)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
