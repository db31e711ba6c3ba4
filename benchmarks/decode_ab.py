"""Decode capture, two checkouts side by side: what a captured decode call costs in each, paired.

On a noisy 2-core machine one ``hot_path.py`` run moves 10-30% between runs of the same code, so a
change to the decode path is timed as pairs: one process per checkout, alternating (A B A B ...), each
building the ``--layers``-layer Llama-style model of ``benchmarks.common.llama`` (one torch thread) and
timing ``--rounds`` interleaved greedy generates of 64 tokens after 32: ``bare``, ``qkl`` (``with
attnhooks.capture(model, record=("q", "k", "lse"))``) and the peer, Hugging Face eager
``generate(output_attentions=True)`` on the same weights. Each process prints the medians of its
main-thread CPU time; the summary gives, per checkout, the median over its processes of the capture's
cost per decode call ((qkl - bare) / calls, µs) and of the ratios to bare.

    python benchmarks/decode_ab.py --tree ../before --tree .        # 5 pairs (~5 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import gc, statistics, sys, time
tree, layers, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(1)
import attnhooks
from benchmarks.common import llama
assert attnhooks.__file__.startswith(tree), attnhooks.__file__
model = llama(64, layers, 4, 128, 128, 104)
eager = llama(64, layers, 4, 128, 128, 104, impl="eager")
ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
kw = dict(input_ids=ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
def qkl():
    with attnhooks.capture(model, record=("q", "k", "lse")):
        model.generate(**kw)
runs = {
    "bare": lambda: model.generate(**kw),
    "qkl": qkl,
    "eager": lambda: eager.generate(**kw, output_attentions=True, return_dict_in_generate=True),
}
for run in runs.values():
    run()
times = {name: [] for name in runs}
names = list(runs)
for i in range(rounds):
    for name in names[i % 3:] + names[:i % 3]:
        gc.collect()
        start = time.thread_time()
        runs[name]()
        times[name].append(time.thread_time() - start)
print(" ".join(f"{name}={statistics.median(t):.6f}" for name, t in times.items()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", required=True, help="a checkout (give two)")
    parser.add_argument("--pairs", type=int, default=5, help="processes per checkout (default 5)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds in each process")
    args = parser.parse_args()
    if len(args.tree) != 2:
        parser.error("give --tree twice: the two checkouts to compare")
    trees = [str(t.resolve()) for t in args.tree]
    calls = args.layers * 64
    per_tree: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for pair in range(args.pairs):
        for tree in trees:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, tree, str(args.layers), str(args.rounds)],
                capture_output=True, text=True, cwd=HERE, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{tree}: the run failed:\n{done.stderr[-3000:]}")
            t = dict((k, float(v)) for k, v in (item.split("=") for item in done.stdout.split()))
            per_tree[tree].append(t)
            cost = (t["qkl"] - t["bare"]) / calls * 1e6
            print(f"pair {pair + 1} {tree}: qkl {t['qkl'] / t['bare']:.3f}x ({cost:.0f} µs a call), "
                  f"eager output_attentions {t['eager'] / t['bare']:.3f}x", flush=True)  # fmt: skip
    print(f"\nmedians of {args.pairs} processes per checkout")
    print("| checkout | qkl µs a decode call | qkl vs bare | eager output_attentions vs bare |")
    print("|---|---:|---:|---:|")
    for tree, runs in per_tree.items():
        cost = statistics.median((r["qkl"] - r["bare"]) / calls * 1e6 for r in runs)
        qkl = statistics.median(r["qkl"] / r["bare"] for r in runs)
        eager = statistics.median(r["eager"] / r["bare"] for r in runs)
        print(f"| {tree} | {cost:.0f} | {qkl:.3f}x | {eager:.3f}x |")


if __name__ == "__main__":
    main()
