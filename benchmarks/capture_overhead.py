"""Capture overhead: what attnhooks costs on top of a plain SDPA forward, in time and memory.

What is measured
----------------
A Llama-style model (transformers ``LlamaConfig``: hidden 768, 12 layers, 12 heads, 12 KV heads,
intermediate 2048, vocab 32000), randomly initialised (seed 0), float32, ``eval()``, under
``torch.no_grad()``, batch 1, at each ``--lengths`` value, in four configurations:

  ``bare``       ``attn_implementation="sdpa"``, no capture: ``model(input_ids)``.
  ``capture-qk`` the same model under ``attnhooks.capture(model, record=("q", "k"))``.
  ``capture-full`` the same model under ``attnhooks.capture(model)`` (default record
                 ``("attn", "q", "k")``: every layer's full ``[1, 12, L, L]`` float32 attention kept
                 in memory).
  ``eager-attn`` Hugging Face ``attn_implementation="eager"`` with ``output_attentions=True``
                 (same weights: the same model object, implementation switched).

Every forward is ``model(input_ids, use_cache=False)`` (no KV cache, so the cache does not add the
same constant to every configuration); logits are computed as usual.

Time: in this process, all configurations of one length are warmed up with one forward each, then
``--repeats`` rounds time one forward of every configuration, the order rotated each round
(interleaving limits drift from thermal or background noise). A capture's timed span is the whole
``with attnhooks.capture(...)`` block (construction, hook install, forward, removal). Records and
outputs are dropped (and ``gc.collect()`` run) between forwards, outside the timed span. The table
reports the median.

Memory: each (configuration, length) runs in a fresh subprocess (this script with the hidden
``--child CONFIG LENGTH`` flag), which builds the model and the input, records its RSS, then runs
the forward twice (records and outputs dropped in between, so the peak is that of one forward) and
reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. "peak extra" is that peak minus the RSS
after model load and input creation; the absolute peak is reported too. Children run with
``MALLOC_MMAP_THRESHOLD_=131072`` (unless set already) so that freed tensor memory leaves the RSS
and the peak is reproducible to the MiB. Children run one at a time, before the timing, so they
never compete with it for the CPU.

Targets (printed with PASS/FAIL): q/k capture <= 1.05x the bare forward; at 2048 tokens,
full-attention capture <= 0.5x the time of eager ``output_attentions=True``. They are judged on the
default model only; ``--quick`` prints its verdicts for the smoke model, where Python overhead
dominates. The exit status is 0 unless ``--check`` is given and a target fails.

How to run
----------
    python benchmarks/capture_overhead.py                   # lengths 1024 2048, 3 repeats (minutes)
    python benchmarks/capture_overhead.py --quick           # smoke test: 2 tiny layers, 128 tokens (< 1 min)
    python benchmarks/capture_overhead.py --lengths 512 --repeats 5 --layers 4

Threads: ``torch.set_num_threads(--threads)`` (default 2) in the parent and every child.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

CONFIGS = ("bare", "capture-qk", "capture-full", "eager-attn")
LABELS = {
    "bare": "bare SDPA forward",
    "capture-qk": 'capture(record=("q","k"))',
    "capture-full": "capture() (attn+q+k)",
    "eager-attn": "HF eager output_attentions=True",
}
QK_TARGET = 1.05
FULL_VS_EAGER_TARGET = 0.5
FULL_VS_EAGER_LENGTH = 2048
MiB = 1024 * 1024


# -- model ------------------------------------------------------------------------------------
def build(args: argparse.Namespace, impl: str = "sdpa") -> Any:
    from common import llama

    return llama(
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab, max(4096, max(args.lengths)), impl
    )


def set_impl(model: Any, impl: str) -> None:
    """Switch the attention implementation of a loaded model (same weights)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl
    assert model.config._attn_implementation == impl, model.config._attn_implementation


def make_input(args: argparse.Namespace, length: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (1, length), generator=g)


def run_config(model: Any, config: str, input_ids: Any) -> tuple[Any, Any]:
    """One forward of ``config``; returns (output, capture) so the caller decides when to drop them."""
    import attnhooks

    if config == "eager-attn":
        out = model(input_ids, use_cache=False, output_attentions=True)
        return out, None
    if config == "bare":
        return model(input_ids, use_cache=False), None
    cap = attnhooks.capture(model, record=("q", "k")) if config == "capture-qk" else attnhooks.capture(model)
    with cap:
        out = model(input_ids, use_cache=False)
    return out, cap


def check(config: str, out: Any, cap: Any, layers: int) -> None:
    """Cheap sanity check that each configuration did what it claims."""
    if config == "eager-attn":
        attns = getattr(out, "attentions", None)
        assert attns is not None and len(attns) == layers, "eager output_attentions returned no attentions"
    elif cap is not None:
        recs = cap.records
        assert len(recs) == layers, f"{config}: expected {layers} records, got {len(recs)}"
        assert all(r.q is not None and r.k is not None for r in recs), f"{config}: q/k missing"
        want_attn = config == "capture-full"
        assert all((r.attn is not None) == want_attn for r in recs), f"{config}: attn presence wrong"


class Switcher:
    """Puts the shared model in the implementation a configuration needs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.impl = model.config._attn_implementation

    def __call__(self, config: str) -> None:
        impl = "eager" if config == "eager-attn" else "sdpa"
        if impl != self.impl:
            set_impl(self.model, impl)
            self.impl = impl


# -- memory (child process) --------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    # Linux reports KiB, macOS bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    config, length = args.child[0], int(args.child[1])
    if config not in CONFIGS:
        raise SystemExit(f"unknown config {config!r}")
    model = build(args, "eager" if config == "eager-attn" else "sdpa")
    input_ids = make_input(args, length)
    import attnhooks  # noqa: F401  (imported before the baseline, like the model)

    gc.collect()
    base_rss, base_peak = rss_bytes(), maxrss_bytes()
    forward_peaks = []
    with torch.no_grad():
        for _ in range(2):  # two forwards, dropped in between: the peak is that of one forward
            out, cap = run_config(model, config, input_ids)
            check(config, out, cap, args.layers)
            del out, cap
            gc.collect()
            forward_peaks.append(maxrss_bytes())
    result = {
        "config": config,
        "length": length,
        "base_rss": base_rss,
        "base_peak": base_peak,
        "peak": forward_peaks[-1],
        "peak_after_first": forward_peaks[0],
        "rss_after": rss_bytes(),
    }
    print("@@RESULT " + json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, config: str, length: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config, str(length), *passthrough(args)]
    # A fixed glibc mmap threshold: every tensor buffer over 128 KiB is its own mapping, returned to the
    # OS when freed, so RSS follows the live tensors. (glibc's default threshold adapts upwards after
    # large frees, leaving freed buffers in the heap; the peak then varies by +-100 MiB run to run.)
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT ") :])
    raise RuntimeError(f"child {config} {length} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--threads", str(args.threads), "--layers", str(args.layers), "--hidden", str(args.hidden),
        "--heads", str(args.heads), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
        "--lengths", *map(str, args.lengths),
    ]  # fmt: skip


# -- time (this process) -------------------------------------------------------------------------
def measure_time(
    args: argparse.Namespace, length: int, model: Any, log: Callable[[str], None]
) -> dict[str, list[float]]:
    import torch

    switch = Switcher(model)
    input_ids = make_input(args, length)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with torch.no_grad():
        for config in CONFIGS:  # warm-up, and the sanity check
            switch(config)
            out, cap = run_config(model, config, input_ids)
            check(config, out, cap, args.layers)
            del out, cap
            gc.collect()
        for r in range(args.repeats):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for config in order:
                switch(config)
                gc.collect()
                t0 = time.perf_counter()
                out, cap = run_config(model, config, input_ids)
                dt = time.perf_counter() - t0
                check(config, out, cap, args.layers)  # outside the timed span
                del out, cap
                times[config].append(dt)
                log(f"  L={length} repeat {r + 1}/{args.repeats} {config:13s} {dt:8.3f} s")
    switch("bare")  # leave the model on SDPA
    return times


def attnhooks_version() -> str:
    """``attnhooks.__version__`` plus the git commit of its checkout (``+dirty`` with local edits)."""
    import attnhooks

    root = os.path.dirname(os.path.dirname(os.path.abspath(attnhooks.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "attnhooks"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return attnhooks.__version__
    return f"{attnhooks.__version__} ({head}{'+dirty' if dirty else ''})"


# -- report -----------------------------------------------------------------------------------------
def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}x"


def report(
    args: argparse.Namespace, times: dict[int, dict[str, list[float]]], mem: dict[tuple[str, int], dict[str, Any]]
) -> bool:
    import torch
    import transformers

    lines = [
        "| config | length | median s | min-max s | ratio vs bare | peak extra MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts: list[tuple[str, bool]] = []
    for length in args.lengths:
        med = {c: statistics.median(times[length][c]) for c in CONFIGS}
        for config in CONFIGS:
            m = mem.get((config, length))
            extra = f"{(m['peak'] - m['base_rss']) / MiB:.0f}" if m else "n/a"
            peak = f"{m['peak'] / MiB:.0f}" if m else "n/a"
            ratio = med[config] / med["bare"]
            spread = f"{min(times[length][config]):.3f}-{max(times[length][config]):.3f}"
            lines.append(
                f"| {LABELS[config]} | {length} | {med[config]:.3f} | {spread} | {ratio:.3f}x | {extra} | {peak} |"
            )
        qk = med["capture-qk"] / med["bare"]
        verdicts.append((f"q/k capture {qk:.3f}x bare at {length} (target <= {QK_TARGET}x)", qk <= QK_TARGET))
        fe = med["capture-full"] / med["eager-attn"]
        target = length == FULL_VS_EAGER_LENGTH
        text = f"full capture {fe:.3f}x eager output_attentions time at {length}"
        if target:
            verdicts.append((text + f" (target <= {FULL_VS_EAGER_TARGET}x)", fe <= FULL_VS_EAGER_TARGET))
        else:
            verdicts.append((text + " (no target at this length)", True))
    print()
    print(
        f"Llama-style {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}; float32, batch 1, no_grad, use_cache=False; "
        f"median of {args.repeats} interleaved forwards after 1 warm-up; peak = ru_maxrss of a fresh "
        f"subprocess per row, extra = peak - RSS after model load and input."
    )
    print(
        f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch.set_num_threads({args.threads}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, attnhooks {attnhooks_version()}."
    )
    print()
    print("\n".join(lines))
    print()
    print(
        f"Targets: q/k capture <= {QK_TARGET}x bare; at {FULL_VS_EAGER_LENGTH} tokens full-attention "
        f"capture <= {FULL_VS_EAGER_TARGET}x the time of eager output_attentions."
    )
    if args.quick:
        print("- (--quick: smoke model, verdicts not meaningful)")
    for text, ok in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    if FULL_VS_EAGER_LENGTH not in args.lengths:
        print(f"- (the full-vs-eager target applies at {FULL_VS_EAGER_LENGTH} tokens, not measured in this run)")
    for (config, length), m in sorted(mem.items(), key=lambda kv: (kv[0][1], CONFIGS.index(kv[0][0]))):
        if m["base_peak"] > m["peak"] - 1 * MiB and m["base_peak"] > m["base_rss"] + 16 * MiB:
            print(f"- note: {config} L={length}: the load-time peak may mask the forward's peak")
    return all(ok for _, ok in verdicts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="sequence lengths (default 1024 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (default 3)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 1 minute)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target fails")
    p.add_argument("--hidden", type=int, default=768, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--intermediate", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats, args.layers = [128], 2, 2
        args.hidden, args.heads, args.intermediate, args.vocab = 128, 4, 256, 1000
    if args.child:
        child(args)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    mem: dict[tuple[str, int], dict[str, Any]] = {}
    if not args.no_memory:
        for length in args.lengths:
            for config in CONFIGS:
                m = measure_memory(args, config, length)
                mem[(config, length)] = m
                log(
                    f"memory L={length} {config:13s} peak extra {(m['peak'] - m['base_rss']) / MiB:8.0f} MiB "
                    f"(base RSS {m['base_rss'] / MiB:.0f}, peak {m['peak'] / MiB:.0f}, after 1st forward "
                    f"{m['peak_after_first'] / MiB:.0f} MiB)"
                )

    import torch

    torch.set_num_threads(args.threads)
    model = build(args, "sdpa")
    times = {length: measure_time(args, length, model, log) for length in args.lengths}
    ok = report(args, times, mem)
    log(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
