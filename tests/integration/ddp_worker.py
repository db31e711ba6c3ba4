"""One rank of a two-process capture into one rank set, for the crash test of test_ddp.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ddp_worker.py STORE STEPS [--die-at STEP]

Each rank joins a gloo process group (so that :func:`attnhooks.capture` sees its rank), then runs
``STEPS`` forwards of :func:`build_model` on :func:`inputs`, capturing into ``STORE``, and prints
``committed <step>`` once each step is durable. With ``--die-at``, the rank ends its process with
``os._exit(17)`` in the middle of that step, after the attention module ran (its records are on
their way to the writer) and before the step is committed: a crash, without any cleanup.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import attnhooks

WIDTH, HEADS, LENGTH = 32, 4, 12


def build_model() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(WIDTH, HEADS, 64, dropout=0.0, batch_first=True).eval()


def inputs(step: int, rank: int) -> torch.Tensor:
    return torch.randn(2, LENGTH, WIDTH, generator=torch.Generator().manual_seed(100 * rank + step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("steps", type=int)
    parser.add_argument("--die-at", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    with attnhooks.capture(model, store=args.store, record=("attn", "q", "k", "lse")) as cap:
        for step in range(args.steps):
            if step == args.die_at:
                model.linear2.register_forward_hook(lambda *_: os._exit(17))
            with torch.no_grad():
                model(inputs(step, rank))
            cap.flush()
            print(f"committed {step}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
