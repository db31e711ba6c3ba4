"""Train a small character-level Transformer with DDP, capturing its attention every N steps.

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --store ddp-run.zarr --steps 40 --every 10

Each rank trains on its own random windows of a text bundled with attnhooks (the opening of
*Pride and Prejudice*) under ``DistributedDataParallel`` over gloo, on CPUs. attnhooks captures
the attention probabilities, q and k of both layers every ``--every`` steps into one Zarr store in
which every rank writes its own group: no collective operation, no extra synchronisation, and on the
steps in between no interception at all. Read it back in any process::

    st = attnhooks.open_store("ddp-run.zarr")
    st.ranks                                                  # [0, 1]
    st.attention("encoder.layers.0.self_attn", step=10, rank=1)   # [heads, 48, 48]
    st.to_xarray()                                            # a rank dimension, lazy (dask)

Module names are those of the model itself, without DDP's ``module.`` prefix. Run without
torchrun, it trains in one process and writes a plain store. ``--every 0`` trains without capturing:
the losses are the same, to the bit (``--losses DIR`` writes each rank's to ``DIR/rank<r>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import attnhooks

SEQ = 48  # characters per window
BATCH = 8  # windows per rank and step


def corpus() -> tuple[torch.Tensor, list[str]]:
    """The bundled text as character ids, and the characters (the vocabulary)."""
    text = resources.files("attnhooks").joinpath("data/demo.txt").read_text(encoding="utf-8")
    vocab = sorted(set(text))
    return torch.tensor([vocab.index(c) for c in text]), vocab


class CharLM(nn.Module):
    """Embeddings, a causal ``nn.TransformerEncoder`` (pre-norm, no dropout) and a linear head."""

    def __init__(self, vocab: int, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(SEQ, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(n, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def build_model(vocab: int, seed: int = 0) -> CharLM:
    """The same initial weights on every rank (DDP would broadcast rank 0's anyway)."""
    torch.manual_seed(seed)
    return CharLM(vocab)


def batch(ids: torch.Tensor, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s windows at ``step``: inputs and next-character targets ``[BATCH, SEQ]``."""
    generator = torch.Generator().manual_seed(1_000_003 * (rank + 1) + step)
    starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=generator)
    windows = torch.stack([ids[s : s + SEQ + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def loss_of(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(args: argparse.Namespace) -> list[float]:
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    ids, vocab = corpus()
    model = build_model(len(vocab))
    ddp: nn.Module = DDP(model) if distributed else model
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    capturing = args.every > 0
    watch = attnhooks.capture(ddp, store=args.store, every=args.every, mode="overwrite") if capturing else nullcontext()
    losses = []
    start = time.perf_counter()
    with watch as cap:
        for step in range(args.steps):
            if cap is not None:
                cap.step = step  # the training step is the store's step id
            loss = loss_of(ddp, *batch(ids, step, rank))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of all ranks here
            optimizer.step()
            losses.append(loss.item())
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start  # the capture's final flush included
    if rank == 0:
        print(f"trained {args.steps} steps in {seconds:.2f} s ({1000 * seconds / args.steps:.1f} ms/step)", flush=True)
    if distributed:
        dist.barrier()  # every rank is done with gloo before any tears it down (else: an abort at exit)
        dist.destroy_process_group()
    if args.losses:
        Path(args.losses).mkdir(parents=True, exist_ok=True)
        (Path(args.losses) / f"rank{rank}.json").write_text(json.dumps(losses))
    if rank == 0 and capturing:
        with attnhooks.open_store(args.store) as st:
            print(f"{args.store}: ranks {st.ranks}, steps {st.steps}, modules {st.modules}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="ddp-run.zarr", help="where to write the attention (a .zarr path or URL)")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--every", type=int, default=10, help="capture one step in N (0: never)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--losses", default=None, help="a folder for each rank's losses (rank<r>.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
