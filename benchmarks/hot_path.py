"""Hot path: what attnhooks adds per attention call where calls are many and short.

The workloads of issue 19, at ``--layers`` (default 32 and 8), one torch thread (the writer thread
of a store gets the other core), random weights, float32:

``forward``   A Llama-style model (benchmarks.common.llama: hidden 64, 4 heads, 4 KV heads, MLP 128,
              vocab 128), ``model(ids, use_cache=False)`` on a batch of 4 x 64 tokens:
              ``bare`` (SDPA, no capture); ``qk`` / ``attn``: ``with attnhooks.capture(model,
              record=...)`` around each forward; ``qk-held`` / ``attn-held``: one capture held open
              across the forwards (each on its own copy of the model, same weights, so that the other
              configurations stay uncaptured); ``hf-eager``: the same weights with
              ``attn_implementation="eager"`` and ``output_attentions=True``; ``eager-bare``: that
              model without it.
``generate``  Greedy ``generate`` of 64 tokens after a 32-token prompt (batch 1, ``min_new_tokens`` =
              ``max_new_tokens``): ``bare``; ``qkl`` (``record=("q", "k", "lse")`` in memory);
              ``qkl-zarr`` / ``qkl-hdf5`` (the same streamed to a new store per run, timed up to the
              end of the ``with`` block, so including the close); ``hf-eager``:
              ``generate(output_attentions=True, return_dict_in_generate=True)`` on the eager model.
``train``     ``--steps`` training steps (forward, mean loss, backward, SGD) of a ``--layers``-layer
              ``nn.TransformerEncoder`` (d_model 64, 4 heads, feed-forward 128, dropout 0, batch
              4 x 64): ``bare``, and one capture of ``record=("q", "k", "lse")`` held across the steps
              to Zarr and to HDF5 (every step captured), timed up to the end of the ``with`` block.

The configurations of a part run interleaved (``--repeats`` rounds, the order rotated each round,
after one warm-up run of each; the train part has no warm-up run; a garbage collection, untimed, before
each run: a full collection walks the whole process, ~190 ms with a 32-layer model, and one left pending
by a configuration that kept its records would otherwise land in whichever run came next);
medians and the spread (lowest to highest) are printed, with each one's ratio to ``bare`` and the
capture's cost per attention call: (CPU time of the configuration - CPU time of ``bare``) / calls
(process CPU time, so a store's writer thread counts). Store runs also print the close time (the
``with`` block's exit: what the writer had left to write) and the files per captured step. Targets
of the issue print as PASS / FAIL.

    python benchmarks/hot_path.py                        # all parts, 32 and 8 layers (minutes)
    python benchmarks/hot_path.py --parts forward --layers 32 --repeats 9
    python benchmarks/hot_path.py --quick                # smoke sizes (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnhooks
from benchmarks.common import llama

PROMPT, NEW, BATCH, TOKENS = 32, 64, 4, 64


@dataclass
class Config:
    """One configuration of a part: ``run`` does the timed work and returns what the run measured
    besides time (the close time of a store)."""

    run: Callable[[], dict[str, float]]
    calls: int  # attention calls per run
    after: Callable[[], None] = lambda: None  # untimed, after each run (drop records, remove a store)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)


def interleaved(configs: dict[str, Config], repeats: int, warm_up: bool = True) -> None:
    """One warm-up run of each (unless ``warm_up`` is False), then ``repeats`` rounds, the order
    rotated each round."""
    names = list(configs)
    for config in configs.values() if warm_up else ():
        config.run()
        config.after()
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            config = configs[name]
            gc.collect()  # (untimed) a run pays for its own garbage, not for the previous configuration's
            wall, cpu = time.perf_counter(), time.process_time()
            extra = config.run()
            config.wall.append(time.perf_counter() - wall)
            config.cpu.append(time.process_time() - cpu)
            for key, value in extra.items():
                config.extra.setdefault(key, []).append(value)
            config.after()


def _store_run(model: Any, work: Callable[[], Any], path: Path, **kw: Any) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        cap = attnhooks.capture(model, store=str(path), mode="overwrite", **kw)
        cap.__enter__()
        try:
            work()
        except BaseException:
            cap.__exit__(*sys.exc_info())
            raise
        start = time.perf_counter()
        cap.__exit__(None, None, None)
        return {"close_s": time.perf_counter() - start, "files": float(_files(path))}

    return run


def _files(path: Path) -> int:
    if path.is_file():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def _remove(path: Path) -> Callable[[], None]:
    def remove() -> None:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    return remove


def _plain(work: Callable[[], Any]) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        work()
        return {}

    return run


def _captured(model: Any, work: Callable[[], Any], record: tuple[str, ...]) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        with attnhooks.capture(model, record=record):
            work()
        return {}

    return run


def _held(model: Any, work: Callable[[], Any], record: tuple[str, ...], stack: list[Any]) -> Config:
    cap = attnhooks.capture(model, record=record)
    cap.__enter__()
    stack.append(cap)

    return Config(_plain(work), 0, after=cap.clear)


# -- parts --------------------------------------------------------------------------------------------
def forward_part(layers: int, quick: bool) -> tuple[dict[str, Config], list[Any]]:
    tokens = 16 if quick else TOKENS
    ids = torch.randint(0, 128, (BATCH, tokens), generator=torch.Generator().manual_seed(0))
    models = [llama(64, layers, 4, 128, 128, tokens + 8) for _ in range(3)]
    eager = llama(64, layers, 4, 128, 128, tokens + 8, impl="eager")
    held: list[Any] = []

    def work(m: Any) -> Callable[[], Any]:
        return lambda: m(ids, use_cache=False)

    configs = {
        "bare": Config(_plain(work(models[0])), layers),
        "qk": Config(_captured(models[0], work(models[0]), ("q", "k")), layers),
        "attn": Config(_captured(models[0], work(models[0]), ("attn",)), layers),
        "qk-held": _held(models[1], work(models[1]), ("q", "k"), held),
        "attn-held": _held(models[2], work(models[2]), ("attn",), held),
        "hf-eager": Config(_plain(lambda: eager(ids, use_cache=False, output_attentions=True)), layers),
        "eager-bare": Config(_plain(work(eager)), layers),
    }
    configs["qk-held"].calls = configs["attn-held"].calls = layers
    return configs, held


def generate_part(layers: int, quick: bool, where: Path) -> dict[str, Config]:
    prompt, new = (8, 8) if quick else (PROMPT, NEW)
    model = llama(64, layers, 4, 128, 128, prompt + new + 8)
    eager = llama(64, layers, 4, 128, 128, prompt + new + 8, impl="eager")
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    calls = layers * new  # the prefill and new - 1 decode forwards

    def gen() -> Any:
        return model.generate(**kw)

    zarr, h5 = where / f"gen{layers}.zarr", where / f"gen{layers}.h5"
    qkl = ("q", "k", "lse")
    return {
        "bare": Config(_plain(gen), calls),
        "qkl": Config(_captured(model, gen, qkl), calls),
        "qkl-zarr": Config(_store_run(model, gen, zarr, record=qkl), calls, after=_remove(zarr)),
        "qkl-hdf5": Config(_store_run(model, gen, h5, record=qkl), calls, after=_remove(h5)),
        "hf-eager": Config(
            _plain(lambda: eager.generate(**kw, output_attentions=True, return_dict_in_generate=True)), calls
        ),
    }


def train_part(layers: int, steps: int, where: Path) -> dict[str, Config]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, TOKENS, 64, generator=torch.Generator().manual_seed(0))

    def work() -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(x).mean().backward()
            opt.step()

    zarr, h5 = where / f"train{layers}.zarr", where / f"train{layers}.h5"
    qkl = ("q", "k", "lse")
    calls = layers * steps
    return {
        "bare": Config(_plain(work), calls),
        "qkl-zarr": Config(_store_run(model, work, zarr, record=qkl), calls, after=_remove(zarr)),
        "qkl-hdf5": Config(_store_run(model, work, h5, record=qkl), calls, after=_remove(h5)),
    }


# -- report -------------------------------------------------------------------------------------------
def summarize(part: str, layers: int, configs: dict[str, Config], steps_per_run: int) -> list[dict[str, Any]]:
    base, base_cpu = statistics.median(configs["bare"].wall), statistics.median(configs["bare"].cpu)
    rows = []
    for name, c in configs.items():
        wall, cpu = statistics.median(c.wall), statistics.median(c.cpu)
        row: dict[str, Any] = {
            "part": part,
            "layers": layers,
            "config": name,
            "median_ms": wall * 1e3,
            "min_ms": min(c.wall) * 1e3,
            "max_ms": max(c.wall) * 1e3,
            "ratio": wall / base,
            "per_call_us": (cpu - base_cpu) / c.calls * 1e6 if name != "bare" else 0.0,
            "runs": len(c.wall),
        }
        if "close_s" in c.extra:
            row["close_ms"] = statistics.median(c.extra["close_s"]) * 1e3
            row["files_per_step"] = statistics.median(c.extra["files"]) / steps_per_run
        rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("| part | layers | configuration | median ms | spread ms | vs bare | per call µs | close ms | files/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        close = f"{r['close_ms']:.0f}" if "close_ms" in r else ""
        files = f"{r['files_per_step']:.3g}" if "files_per_step" in r else ""
        per_call = f"{r['per_call_us']:+.0f}" if r["config"] != "bare" else ""
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        print(
            f"| {r['part']} | {r['layers']} | {r['config']} | {r['median_ms']:.1f} | {spread} "
            f"| {r['ratio']:.2f}x | {per_call} | {close} | {files} |"
        )


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The issue's targets, judged at the largest layer count measured."""
    if not rows:
        return []
    top = max(r["layers"] for r in rows)
    by = {(r["part"], r["config"]): r for r in rows if r["layers"] == top}
    out: list[tuple[str, bool]] = []

    def ratio(part: str, config: str) -> float | None:
        row = by.get((part, config))
        return None if row is None else float(row["ratio"])

    checks = [
        ("forward", "qk", 1.10, "forward q/k, capture per step <= 1.10x"),
        ("forward", "qk-held", 1.05, "forward q/k, capture held open <= 1.05x"),
        ("generate", "qkl", 1.10, "generate q/k/lse in memory <= 1.10x"),
        ("generate", "qkl-zarr", 1.25, "generate q/k/lse to Zarr <= 1.25x"),
        ("generate", "qkl-hdf5", 1.25, "generate q/k/lse to HDF5 <= 1.25x"),
        ("train", "qkl-zarr", 1.5, "training steps q/k/lse to Zarr <= 1.5x (incl. close)"),
    ]
    for part, config, target, label in checks:
        value = ratio(part, config)
        if value is not None:
            out.append((f"{label}: {value:.2f}x", value <= target))
    eager = ratio("forward", "hf-eager")
    attn = ratio("forward", "attn")
    if eager is not None and attn is not None:
        out.append((f"forward attn per step {attn:.2f}x <= HF eager output_attentions {eager:.2f}x", attn <= eager))
    row = by.get(("forward", "qk-held"))
    if row is not None:
        out.append(
            (f"per-call overhead, q/k in memory (held): {row['per_call_us']:.0f} µs <= 50 µs", row["per_call_us"] <= 50)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="forward,generate,train", help="comma-separated: forward, generate, train")
    p.add_argument("--layers", type=int, nargs="+", default=[32, 8], help="layer counts (default 32 8)")
    p.add_argument("--repeats", type=int, default=7, help="rounds of the forward part (default 7)")
    p.add_argument("--gen-repeats", type=int, default=5, help="rounds of the generate part (default 5)")
    p.add_argument("--train-repeats", type=int, default=1, help="rounds of the train part (default 1)")
    p.add_argument("--steps", type=int, default=200, help="training steps per train run (default 200)")
    p.add_argument("--quick", action="store_true", help="smoke sizes: 2 layers, 16 tokens, 8+8 generated, 3 steps")
    p.add_argument("--dir", default=None, help="where the stores are written (default: a temporary directory)")
    p.add_argument("--out", metavar="JSON", help="write every measurement to this JSON file")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target fails")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.repeats, args.gen_repeats, args.steps = [2], 1, 1, 3
    torch.set_num_threads(1)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    where = Path(tempfile.mkdtemp(prefix="attnhooks-hot-", dir=args.dir))
    rows: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for layers in args.layers:
                if "forward" in parts:
                    configs, held = forward_part(layers, args.quick)
                    try:
                        interleaved(configs, args.repeats)
                    finally:
                        for cap in reversed(held):
                            cap.__exit__(None, None, None)
                    rows += summarize("forward", layers, configs, 1)
                if "generate" in parts:
                    configs = generate_part(layers, args.quick, where)
                    interleaved(configs, args.gen_repeats)
                    rows += summarize("generate", layers, configs, 1)
        for layers in args.layers:
            if "train" in parts:
                configs = train_part(layers, args.steps, where)
                interleaved(configs, args.train_repeats, warm_up=False)  # 200 steps warm themselves up
                rows += summarize("train", layers, configs, args.steps)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, attnhooks {attnhooks.__version__}; "
        f"forward {args.repeats} rounds, generate {args.gen_repeats}, train {args.train_repeats} x {args.steps} steps"
    )
    print_rows(rows)
    judged = verdicts(rows)
    for label, ok in judged:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "targets": [[lab, ok] for lab, ok in judged]}, indent=1))
    return 1 if args.check and not all(ok for _, ok in judged) else 0


if __name__ == "__main__":
    sys.exit(main())
