"""Decode overhead: what attnhooks adds per generated token, beside Hugging Face's own way.

A 32-layer Llama-style model (hidden 64, 4 heads, 4 KV heads; benchmarks.common.llama), random
weights, float32, one torch thread, greedy ``generate`` of ``--new`` tokens after a ``--prompt``-token
prompt (``min_new_tokens`` = ``max_new_tokens``: every run decodes the same count), in four ways:

  ``bare``          SDPA model, no capture.
  ``attnhooks-qkl`` the SDPA model under ``attnhooks.capture(model, record=("q", "k", "lse"))``
                    (every decode call recorded in memory: one query row and one key per call).
  ``eager-bare``    the same weights with ``attn_implementation="eager"``, no capture.
  ``hf-eager``      Hugging Face's eager ``generate(output_attentions=True,
                    return_dict_in_generate=True)``: the peer a user would reach for.

The configurations run interleaved (``--repeats`` rounds, order rotated each round) and the medians
are printed, with each one's ratio to ``bare`` and its extra milliseconds per token.

    python benchmarks/decode_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnhooks
from benchmarks.common import llama


def runs(prompt: int, new: int) -> dict[str, Callable[[], None]]:
    sdpa = llama(64, 32, 4, 128, 128, prompt + new + 8)
    eager = llama(64, 32, 4, 128, 128, prompt + new + 8, impl="eager")
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def bare() -> None:
        sdpa.generate(**kw)

    def captured() -> None:
        with attnhooks.capture(sdpa, record=("q", "k", "lse")) as cap:
            sdpa.generate(**kw)
        assert len({r.call for r in cap.records}) == 1, "decode calls continue the prefill's"

    def eager_bare() -> None:
        eager.generate(**kw)

    def hf_eager() -> None:
        eager.generate(**kw, output_attentions=True, return_dict_in_generate=True)

    return {"bare": bare, "attnhooks-qkl": captured, "eager-bare": eager_bare, "hf-eager": hf_eager}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = runs(args.prompt, args.new)
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    with torch.no_grad():
        for fn in configs.values():
            fn()  # warm-up
        for round_ in range(args.repeats):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                configs[name]()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bare"])
    print(
        f"greedy generate, 32 layers, {args.prompt}-token prompt + {args.new} tokens, 1 thread, "
        f"medians of {args.repeats}"
    )
    for name in names:
        t = statistics.median(times[name])
        print(f"{name:14s} {t * 1000:8.0f} ms  {t / base:5.2f}x bare  {(t - base) / args.new * 1000:+7.2f} ms/token")


if __name__ == "__main__":
    main()
