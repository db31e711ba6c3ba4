"""A ``torch.compile``d model trained with and without attnhooks' callback capturing every N steps.

    python benchmarks/compile_callback.py                 # N=10, 200 steps, 2 threads
    python benchmarks/compile_callback.py --every 10 --steps 300 --repeats 3

The model is a 2-layer causal transformer of plain ``nn.Module``\\ s (SDPA attention, 128 wide, 4
heads, 128 tokens, batch 16), compiled with the default CPU inductor backend. Both runs drive the
same windows the callbacks use (:class:`attnhooks.integrations.core.CallbackCore`): on a captured
step the compiler's stance is ``force_eager`` and the model runs its Python modules eagerly while the
capture records the attention (metrics only: entropy, sink, previous, induction, distance, logged to a
TensorBoard writer with the grid figure); every other step runs the compiled graph, with nothing of
attnhooks installed. Runs are interleaved (bare, callback, bare, callback, ...) in one process; the
inductor cache is warmed first, so every run compiles its graphs from the cache.

Printed: the whole-run times (best of the repeats) and their ratio, the time of the steps alone
(after the first, compiled, step), the eager captured steps' time against the compiled steps', and
torch._dynamo's counters of each run: frames compiled, unique graphs, recompilations, graph breaks.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnhooks.integrations.core import CallbackCore

VOCAB, WIDTH, HEADS, LENGTH, BATCH = 256, 128, 4, 128, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, n, WIDTH))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(VOCAB, WIDTH), nn.Embedding(LENGTH, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def run(start: dict[str, torch.Tensor], steps: int, every: int | None, log_dir: str) -> dict[str, Any]:
    from torch._dynamo.utils import counters
    from torch.utils.tensorboard import SummaryWriter

    torch._dynamo.reset()
    counters.clear()
    model = Model()
    model.load_state_dict(start)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    writer = SummaryWriter(log_dir) if every else None
    core = CallbackCore(every, loggers=[writer]) if every else None
    if core is not None:
        core.check(model)
    generator = torch.Generator().manual_seed(0)
    times: list[tuple[bool, float]] = []
    begin = time.perf_counter()
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=generator)
        t0 = time.perf_counter()
        captured = core is not None and core.captures(step)
        if captured:
            core.train.open(model, step)  # type: ignore[union-attr]
        loss = F.cross_entropy(compiled(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if core is not None:
            core.emit(core.train.close())
        times.append((captured, time.perf_counter() - t0))
    total = time.perf_counter() - begin
    if writer is not None:
        writer.close()
    later = times[1:]
    eager = [t for c, t in later if c]
    graph = [t for c, t in later if not c]
    return {
        "total_s": total,
        "steps_after_first_s": sum(t for _, t in later),
        "captured_step_ms": 1e3 * sum(eager) / len(eager) if eager else None,
        "compiled_step_ms": 1e3 * sum(graph) / len(graph),
        "frames": dict(counters["frames"]),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = copy.deepcopy(Model().state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        run(start, 3, None, tmp)  # warm the inductor cache: both runs then compile from it
        bare, callback = [], []
        for r in range(args.repeats):
            bare.append(run(start, args.steps, None, tmp))
            callback.append(run(start, args.steps, args.every, f"{tmp}/tb{r}"))
    best_bare = min(bare, key=lambda x: x["total_s"])
    best_callback = min(callback, key=lambda x: x["total_s"])
    report = {
        "machine": f"torch {torch.__version__}, {args.threads} threads, CPU inductor",
        "steps": args.steps,
        "every": args.every,
        "whole_run_ratio": round(best_callback["total_s"] / best_bare["total_s"], 3),
        "steps_only_ratio": round(best_callback["steps_after_first_s"] / best_bare["steps_after_first_s"], 3),
        "eager_captured_vs_compiled_step": round(
            best_callback["captured_step_ms"] / best_callback["compiled_step_ms"], 2
        ),
        "bare": [_rounded(x) for x in bare],
        "callback": [_rounded(x) for x in callback],
    }
    print(json.dumps(report, indent=2))


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


if __name__ == "__main__":
    main()
