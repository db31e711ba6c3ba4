"""Hot path in instructions: what attnhooks adds per attention call, counted, not timed.

On a shared 2-core VM the same configuration of ``hot_path.py`` times 1.14x in one run and 1.59x in
the next, so a change that saves 10% of a call cannot be seen in wall or CPU time. The instructions a
process executes do not depend on its neighbours: this runs each configuration in its own process under
valgrind's callgrind (instrumentation switched on with ``callgrind_control`` after two warm-up runs, so
imports and model building are not counted; ``PYTHONHASHSEED=0``, so dict layouts repeat) and prints
the instructions of ``--runs`` runs per attention call, their difference to ``bare`` and how many of
them ran outside the model's thread (a store's writer, zarr's event loop): the same
count each time for the same code (checked: two runs of one tree gave the same count to the
instruction).

Instructions are not time: Python's interpreter runs at a fraction of the instructions per cycle of
the model's matmul kernels, so a 5% instruction ratio shows as ~10% of time. Use this to compare two
versions of the hot path (``--tree`` another checkout), and ``hot_path.py`` for the ratios users see.

Workloads (one torch thread, random weights, the Llama-style model of ``benchmarks.common.llama``):
``generate``  greedy ``generate`` of ``--new`` tokens after a 16-token prompt, ``--layers`` layers:
              ``bare``, ``qkl`` (``record=("q", "k", "lse")``), ``qk`` (``record=("q", "k")``), each
              in memory with ``with capture(...)`` around the ``generate``.
``store``     the same ``generate``: ``bare``, ``qkl`` in memory, and ``qkl-zarr`` / ``qkl-hdf5`` streamed to
              a new store each run (every thread counted: the writer's, zarr's event loop), up to the
              end of the ``with`` block, so including the close.
``forward``   ``model(ids, use_cache=False)`` on 4 x 64 tokens, ``--layers`` layers: ``bare``,
              ``qk-held`` (one capture held open), ``qk-step`` (``with capture`` around each forward).

    python benchmarks/instructions.py                      # generate, 8 layers x 16 tokens (~3 minutes)
    python benchmarks/instructions.py --parts forward      # 8 layers; ~2 minutes
    python benchmarks/instructions.py --parts store        # generate to Zarr and HDF5; ~4 minutes
    python benchmarks/instructions.py --tree ../other      # the same, for another checkout (A/B)

Needs ``valgrind`` (``apt-get install valgrind``); a few minutes (callgrind runs ~50x slower).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# the child: build the model, warm up twice, count `runs` runs of the configuration
CHILD = r"""
import itertools, os, subprocess, sys, tempfile
tree, part, config, layers, new, runs = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(1)
import attnhooks
from benchmarks.common import llama
if part in ("generate", "store"):
    model = llama(64, layers, 4, 128, 128, 16 + new + 8)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    work = lambda: model.generate(**kw)
else:
    model = llama(64, layers, 4, 128, 128, 72)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    work = lambda: model(ids, use_cache=False)
record = ("q", "k", "lse") if config.startswith("qkl") else ("q", "k")
suffix = {"qkl-zarr": ".zarr", "qkl-hdf5": ".h5"}.get(config)
where, numbers = tempfile.mkdtemp(dir=os.path.dirname(__file__)), itertools.count()  # removed with it
held = None
if config.endswith("-held"):
    held = attnhooks.capture(model, record=record)
    held.__enter__()
def run():
    if config == "bare":
        work()
    elif held is not None:
        work()
        held.clear()
    elif suffix is not None:  # a new path each run: nothing to remove inside the count
        with attnhooks.capture(model, record=record, store=os.path.join(where, f"{next(numbers)}{suffix}")):
            work()
    else:
        with attnhooks.capture(model, record=record):
            work()
run(); run()
subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=True)
for _ in range(runs):
    run()
subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=True)
"""

CONFIGS = {
    "generate": ("bare", "qkl", "qk"),
    "store": ("bare", "qkl", "qkl-zarr", "qkl-hdf5"),
    "forward": ("bare", "qk-held", "qk-step"),
}


def count(tree: Path, part: str, config: str, layers: int, new: int, runs: int, where: Path) -> tuple[int, int]:
    """Instructions callgrind counted for ``runs`` runs of one configuration: in all, and in the model's
    (the main) thread."""
    child = where / "child.py"
    out = where / f"callgrind.{part}.{config}.{os.getpid()}"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    cmd += [f"--callgrind-out-file={out}", sys.executable, str(child), str(tree), part, config]
    cmd += [str(layers), str(new), str(runs)]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{part}/{config} failed under callgrind:\n{done.stderr[-3000:]}")
    main = re.search(r"^totals: (\d+)", Path(f"{out}-01").read_text(), re.M)  # thread 1: the model's
    return int(found.group(1)), int(main.group(1)) if main else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="generate", help="comma-separated: generate, store, forward")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new", type=int, default=16, help="tokens generated (generate)")
    parser.add_argument("--runs", type=int, default=3, help="counted runs per configuration")
    parser.add_argument("--jobs", type=int, default=2, help="configurations counted at once")
    parser.add_argument("--tree", type=Path, default=HERE, help="the checkout whose attnhooks is counted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("benchmarks/instructions.py needs valgrind: apt-get install valgrind")
    tree = args.tree.resolve()
    print(f"attnhooks at {tree}; {args.layers} layers; instructions per attention call ({args.runs} runs counted)")
    print("| part | configuration | instructions / call | attnhooks adds / call | of which other threads | vs bare |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        (where / "child.py").write_text(CHILD)
        for part in args.parts.split(","):
            calls = args.layers * (1 if part == "forward" else args.new) * args.runs
            with ThreadPoolExecutor(args.jobs) as pool:
                sizes = (args.layers, args.new, args.runs)
                jobs = {c: pool.submit(count, tree, part, c, *sizes, where) for c in CONFIGS[part]}
                counts = {c: job.result() for c, job in jobs.items()}
            bare = counts["bare"][0]
            for config, (n, main) in counts.items():
                added = "" if config == "bare" else f"{(n - bare) / calls / 1e3:+.1f}K"
                others = f"{(n - main) / calls / 1e3:.1f}K" if config != "bare" and main else ""
                print(f"| {part} | {config} | {n / calls / 1e3:.1f}K | {added} | {others} | {n / bare:.3f}x |")


if __name__ == "__main__":
    main()
