"""Long context: q/k/lse capture and blockwise reductions against a bare SDPA forward at 8k-32k tokens.

What is measured
----------------
A Llama-style model (``benchmarks/common.py``: hidden 768, 12 heads, 12 KV heads, intermediate
3072, vocab 32000), randomly initialised (seed 0), float32, ``eval()``, SDPA, batch 1, every forward
``model(input_ids, use_cache=False)`` under ``torch.no_grad()``. Configurations:

  ``bare``     no capture.
  ``qkl``      ``attnhooks.capture(model, store=<tmp>.zarr, record=("q", "k", "lse"))``: on CPU the
               SDPA call runs the flash kernel SDPA would run anyway, which returns the row lse.
  ``summary``  the same with ``record=("q", "k", "lse", "summary")`` and default summary sizes
               (top-8 keys, 4 sinks, 64 diagonals, 256 x 256 overview, blocks of at most 1024
               rows and 8 MiB of scores); the row reductions run in attnhooks' C kernel when it
               builds (the report says which path ran: ``attnhooks.reduce.native.status()``).
  ``eager``    ``attn_implementation="eager"``, ``output_attentions=True`` (every layer's
               ``[1, heads, n, n]`` float32 attention returned).

Stores use the capture's defaults (zarr; zstd level 1, but q, k, lse and the float row summaries
written raw; ``buffer="1GiB"``, ``when_full="block"``).

1. Main, ``--tokens`` (8192) tokens, ``--layers`` (12): bare, qkl, summary. Targets: qkl <= 1.05x
   bare, summary <= 2.0x bare (median wall time), and each capture's peak RSS <= bare's + 1 GiB.
2. Eager contrast: the memory eager ``output_attentions`` would need at ``--tokens`` (returned
   attentions ``layers x heads x n^2 x 4`` bytes, plus one more layer's scores and the ``n x n`` mask
   as temporaries) against this machine's RAM; it also runs in the main section when that fits in
   ``MemAvailable``. At ``--eager-tokens`` (2048) bare, summary and eager run for a time ratio.
3. Long, ``--long-tokens`` (32768) tokens, ``--long-layers`` (4): bare and summary, once each.
   Then the summary's store is opened and, for layer ``--long-layers - 1``, ``st.attention(...,
   method="reconstructed")`` rebuilds rows ``--window``..+512 (one head, every key) and the 512 x 512
   diagonal tile of those rows (every head); both are compared with a direct float64 recomputation
   (softmax of ``q k^T * scale`` under the causal mask, those rows only) from the model's own q and k:
   a forward pre-hook on that layer's attention copies its input rows ``0..window+512`` (and RoPE
   cos/sin) during the measured forward, and q, k are recomputed with the layer's ``q_proj`` /
   ``k_proj`` and transformers' ``apply_rotary_pos_emb``. Target: max abs diff <= 1e-5.

Time: the wall time of the ``with capture(...)`` block (hooks, forward, draining the writer, closing
the store) or of the bare forward. Each measurement is one forward in its own child process, after a
64-token warm-up forward of the same configuration; ``--repeats`` rounds run every configuration of a
section once, the order rotated each round; the table reports the median (and min-max). Five rounds
by default: on this 2-core VM the same forward's time moves by +-10% from one minute to the next,
more than the q/k/lse capture's own cost (~2%: the copies of q and k, and the writer's ~0.8 s of CPU
per 576 MiB written, taken from the model's threads).

Memory: in each child, after model load, input creation and the warm-up, the kernel's RSS high-water
mark is reset (``/proc/self/clear_refs``) and the RSS read; "peak extra" = ``ru_maxrss`` after the
timed forward minus that RSS (max over the repeats). Children run with ``MALLOC_MMAP_THRESHOLD_=131072``
(as in capture_overhead.py) so freed tensors leave the RSS.

Children: a "zygote" subprocess (this script with the hidden ``--zygote`` flag) imports torch,
transformers, attnhooks and zarr once, runs no torch op, and ``os.fork()``s one child per
measurement (forking after OpenMP has run would hang the child; the zygote never runs it). Each
child is a fresh process that builds its own model; the imports are shared, which saves ~9 s a child.

How to run
----------
    python benchmarks/long_context.py                    # everything (~20 minutes on 2 cores)
    python benchmarks/long_context.py --quick            # smoke sizes (< 1 minute)
    python benchmarks/long_context.py --parts main --repeats 1 --out long.json
    python benchmarks/long_context.py --parts "" --profile summary     # only a cProfile of one capture

Threads: ``torch.set_num_threads(--threads)`` (default 2) in every child.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
RECORDS = {"qkl": ("q", "k", "lse"), "summary": ("q", "k", "lse", "summary")}
LABELS = {
    "bare": "bare SDPA forward",
    "qkl": 'capture(record=("q","k","lse"))',
    "summary": "q/k/lse + summary",
    "eager": "eager output_attentions=True",
}
MAIN = ("bare", "qkl", "summary")
CONTRAST = ("bare", "summary", "eager")
LONG = ("bare", "summary")
QKL_TARGET = 1.05
SUMMARY_TARGET = 2.0
MEMORY_TARGET = 1 * GiB
TOL = 1e-5
WINDOW = 512
WARMUP_TOKENS = 64


# -- one measurement (in a child) -------------------------------------------------------------
def build_model(job: dict[str, Any]) -> Any:
    from common import llama

    m = job["model"]
    impl = "eager" if job["config"] == "eager" else "sdpa"
    return llama(m["hidden"], m["layers"], m["heads"], m["intermediate"], m["vocab"], job["tokens"], impl)


def make_input(vocab: int, tokens: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (1, tokens), generator=g)


def timed_forward(model: Any, config: str, ids: Any, store: str) -> tuple[dict[str, float], Any]:
    """One forward of ``config`` (a capture writes ``store``): its timings, and its output (kept by
    the caller until the peak is read, so every configuration holds its logits at the end)."""
    import attnhooks

    if config in ("bare", "eager"):
        kw = {"output_attentions": True} if config == "eager" else {}
        start = time.perf_counter()
        out = model(ids, use_cache=False, **kw)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "forward_s": seconds, "close_s": 0.0}, out
    start = time.perf_counter()
    with attnhooks.capture(model, store=store, record=RECORDS[config]) as cap:
        writer = cap.writer
        out = model(ids, use_cache=False)
        returned = time.perf_counter()
    end = time.perf_counter()
    times = {"seconds": end - start, "forward_s": returned - start, "close_s": end - returned}
    return {**times, "blocked_s": writer.budget.blocked_s}, out


class Tap:
    """Copies one attention module's input rows ``0..stop`` and RoPE cos/sin during the forward of
    ``tokens`` tokens: enough to recompute its q for rows below ``stop`` and its k for keys below it."""

    def __init__(self, model: Any, layer: int, tokens: int, stop: int) -> None:
        self.name = f"model.layers.{layer}.self_attn"
        self.module = model.get_submodule(self.name)
        self.tokens, self.stop = tokens, stop
        self.saved: tuple[Any, Any, Any] | None = None
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[1] == self.tokens:  # not the warm-up
            cos, sin = kwargs["position_embeddings"]
            self.saved = tuple(t[:, : self.stop].clone() for t in (hidden, cos, sin))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved or ())

    def qk(self, rows: slice) -> tuple[Any, Any]:
        """The module's own q of ``rows`` ``[heads, r, d]`` and k of keys ``0..stop`` ``[heads, stop, d]``."""
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if self.saved is None:
            raise RuntimeError(f"{self.name} did not run with {self.tokens} tokens")
        hidden, cos, sin = self.saved

        def project(proj: Any, part: slice) -> Any:
            x = proj(hidden[:, part])
            x = x.view(1, x.shape[1], -1, self.module.head_dim).transpose(1, 2)
            return apply_rotary_pos_emb(x, x, cos[:, part], sin[:, part])[0][0]

        with torch.no_grad():
            return project(self.module.q_proj, rows), project(self.module.k_proj, slice(0, self.stop))


def direct_probs(q: Any, k: Any, first_row: int, scale: float) -> Any:
    """float64 softmax of ``q k^T * scale`` under the causal mask; ``q [r, d]`` holds rows
    ``first_row..``, ``k [n, d]`` keys ``0..n``; returns numpy ``[r, n]``."""
    import torch

    s = (q.double() @ k.double().T) * scale
    rows = torch.arange(first_row, first_row + q.shape[0])[:, None]
    s.masked_fill_(torch.arange(k.shape[0])[None, :] > rows, -math.inf)
    return torch.softmax(s, dim=-1).numpy()


def verify(store: str, tap: Tap, window: int) -> dict[str, Any]:
    """The tapped layer's rows ``window..+512`` rebuilt from the store against a direct
    recomputation from the model's own q/k: one head over every key, and every head's diagonal tile."""
    import numpy as np

    import attnhooks

    rows = slice(window, window + WINDOW)
    q, k = tap.qk(rows)
    heads, head, scale = q.shape[0], q.shape[0] // 2, float(tap.module.scaling)
    out: dict[str, Any] = {"module": tap.name, "rows": [rows.start, rows.stop], "head": head, "tap_bytes": tap.nbytes()}
    with attnhooks.open_store(store) as st:
        start = time.perf_counter()
        got = st.attention(tap.name, 0, heads=head, rows=rows, method="reconstructed")  # [512, every key]
        out["window_s"] = time.perf_counter() - start
        start = time.perf_counter()
        tile = st.attention(tap.name, 0, rows=rows, cols=rows, method="reconstructed")  # [heads, 512, 512]
        out["tile_s"] = time.perf_counter() - start
        stored_q, stored_k = st.q(tap.name, 0)[:, rows], st.k(tap.name, 0)[:, : tap.stop]
    want = direct_probs(q[head], k[head], rows.start, scale)  # keys past rows.stop are masked: 0
    out["keys"] = got.shape[-1]
    below, beyond = got[:, : tap.stop], got[:, tap.stop :]
    out["window_diff"] = max(float(np.abs(below - want).max()), float(np.abs(beyond).max(initial=0)))
    out["window_max"] = float(want.max())
    out["tile_diff"] = max(
        float(np.abs(tile[h] - direct_probs(q[h], k[h], rows.start, scale)[:, rows]).max()) for h in range(heads)
    )
    out["q_diff"] = float(np.abs(stored_q - q.numpy()).max())
    out["k_diff"] = float(np.abs(stored_k - k.numpy()).max())
    return out


def check_store(store: str, job: dict[str, Any]) -> None:
    """The capture stored what it claims: complete, every layer, the summary when asked for."""
    import attnhooks

    layers = job["model"]["layers"]
    with attnhooks.open_store(store) as st:
        if st.status != "complete" or len(st.modules) != layers:
            raise RuntimeError(f"{store}: status {st.status!r}, {len(st.modules)} modules (expected {layers})")
        if job["config"] == "summary" and "entropy" not in st.summary(st.modules[-1], 0):
            raise RuntimeError(f"{store}: no summary")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def profiled(enabled: bool) -> Any:
    import contextlib
    import cProfile

    return cProfile.Profile() if enabled else contextlib.nullcontext()


def profile_text(profiler: Any, top: int = 25) -> str:
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up, reset the peak, time one forward of ``job["config"]``, check what it wrote."""
    import torch

    torch.set_num_threads(job["threads"])
    config, tokens = job["config"], job["tokens"]
    model = build_model(job)
    ids = make_input(job["model"]["vocab"], tokens)
    tap = Tap(model, job["model"]["layers"] - 1, tokens, job["window"] + WINDOW) if job.get("window") else None
    store = os.path.join(job["dir"], f"{config}-{tokens}-{os.getpid()}.zarr")
    with torch.no_grad():
        timed_forward(model, config, ids[:, :WARMUP_TOKENS], store)
        shutil.rmtree(store, ignore_errors=True)
        gc.collect()
        from common import reset_rss_peak

        reset = reset_rss_peak()
        base = rss_bytes()
        with profiled(bool(job.get("profile"))) as profiler:
            times, out = timed_forward(model, config, ids, store)
        peak = maxrss_bytes()
    del out
    result = {"config": config, "tokens": tokens, **times, "base_rss": base, "peak": peak, "reset": reset}
    result["load"] = os.getloadavg()[0]  # 1-minute load average: > threads means something else ran
    if config in RECORDS:
        result["store_bytes"] = disk_bytes(store)
        check_store(store, job)
    if tap is not None:
        result["check"] = verify(store, tap, job["window"])
    if job.get("profile"):
        result["profile"] = profile_text(profiler)
    if config == "summary":
        import attnhooks.reduce.native

        result["kernel"] = attnhooks.reduce.native.status()  # the C row kernel, or torch's ops (and why)
    shutil.rmtree(store, ignore_errors=True)
    return result


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -- the zygote: imports once, forks a fresh child per measurement --------------------------------
def zygote() -> None:
    """Import everything, then per job line on stdin: fork, measure in the child, print its result."""
    import traceback

    import numpy
    import torch
    import transformers
    import zarr
    from capture_overhead import attnhooks_version
    from transformers import LlamaForCausalLM  # noqa: F401

    import attnhooks  # noqa: F401

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, zarr {zarr.__version__}, "
    versions += f"numpy {numpy.__version__}, Python {platform.python_version()}, attnhooks {attnhooks_version()}"
    print("@@READY " + json.dumps({"versions": versions}), flush=True)
    for line in iter(sys.stdin.readline, ""):
        job = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read)
            code = 0
            try:
                payload = json.dumps(measure(job))
            except BaseException:
                traceback.print_exc()
                payload, code = "", 1
            with os.fdopen(write, "w") as f:
                f.write(payload)
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        print("@@RESULT " + json.dumps({"status": status, "payload": payload}), flush=True)


class Zygote:
    """The parent's handle on the zygote subprocess."""

    def __init__(self) -> None:
        # A fixed glibc mmap threshold (inherited by every fork): tensor buffers over 128 KiB are their
        # own mappings, returned to the OS when freed, so the RSS follows the live tensors.
        env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), **os.environ}
        cmd = [sys.executable, os.path.abspath(__file__), "--zygote"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self._expect("@@READY "))

    def _expect(self, tag: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :]
        raise RuntimeError(f"the zygote exited (rc {self.proc.wait()}) before sending {tag.strip()}")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._expect("@@RESULT "))
        if reply["status"] != 0 or not reply["payload"]:
            raise RuntimeError(
                f"{job['config']} at {job['tokens']} tokens failed (wait status {reply['status']}; a child "
                "killed for memory shows signal 9): see its traceback above"
            )
        return dict(json.loads(reply["payload"]))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


# -- the sections (in the parent) ------------------------------------------------------------------
def model_sizes(args: argparse.Namespace, layers: int) -> dict[str, int]:
    names = ("hidden", "heads", "intermediate", "vocab")
    return {"layers": layers, **{name: getattr(args, name) for name in names}}


def rounds(configs: tuple[str, ...], repeats: int) -> Iterator[tuple[int, str]]:
    """(round, config): every configuration once a round, the order rotated each round."""
    for r in range(repeats):
        shift = r % len(configs)
        for config in configs[shift:] + configs[:shift]:
            yield r, config


def section(
    zy: Zygote,
    args: argparse.Namespace,
    configs: tuple[str, ...],
    tokens: int,
    layers: int,
    repeats: int,
    log: Callable[[str], None],
    window: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every configuration ``repeats`` times, each in its own child: config -> results."""
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r, config in rounds(configs, repeats):
        job = {"config": config, "tokens": tokens, "model": model_sizes(args, layers), "threads": args.threads,
               "dir": args.dir, "window": window if config == "summary" else None}  # fmt: skip
        m = zy.run(job)
        out[config].append(m)
        log(
            f"  {tokens} tokens, {layers} layers, round {r + 1}/{repeats}: {config:8s} {m['seconds']:8.2f} s, "
            f"peak extra {(m['peak'] - m['base_rss']) / MiB:7.0f} MiB, load {m['load']:.2f}"
        )
    return out


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return {}


def eager_need(tokens: int, layers: int, heads: int) -> tuple[int, int]:
    """Bytes eager ``output_attentions`` needs beyond a bare forward: (returned attentions, temporaries).
    One layer's ``[heads, n, n]`` scores are alive twice (scores + mask sum and its softmax), once
    more than what is returned, and the causal mask ``[n, n]`` is float32."""
    layer = heads * tokens * tokens * 4
    return layers * layer, layer + tokens * tokens * 4


# -- report ---------------------------------------------------------------------------------------
def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def extra(m: dict[str, Any]) -> int:
    return int(m["peak"] - m["base_rss"])


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration: median / min / max seconds and its parts, worst peak extra, store size."""
    out = {}
    for config, ms in runs.items():
        secs = [m["seconds"] for m in ms]
        s = {"median": statistics.median(secs), "min": min(secs), "max": max(secs), "extra": max(map(extra, ms))}
        for part in ("forward_s", "close_s", "blocked_s"):
            s[part] = statistics.median(m.get(part, 0.0) for m in ms)
        s["store"] = ms[-1].get("store_bytes")
        s["peak"] = max(m["peak"] for m in ms)
        out[config] = s
    return out


def table(stats: dict[str, dict[str, Any]], tokens: int, layers: int) -> list[str]:
    bare = stats["bare"]
    lines = [
        row("configuration", "tokens", "layers", "median s", "min-max s", "ratio vs bare", "forward s", "close s",
            "writer-blocked s", "peak extra MiB", "vs bare MiB", "store MiB"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for config, s in stats.items():
        store = "-" if s["store"] is None else f"{s['store'] / MiB:.0f}"
        lines.append(
            row(LABELS[config], tokens, layers, f"{s['median']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}",
                f"{s['median'] / bare['median']:.3f}x", f"{s['forward_s']:.2f}", f"{s['close_s']:.2f}",
                f"{s['blocked_s']:.2f}", f"{s['extra'] / MiB:.0f}", f"{(s['extra'] - bare['extra']) / MiB:+.0f}",
                store)
        )  # fmt: skip
    return lines


def verdict(ok: bool, text: str) -> str:
    return f"- {'PASS' if ok else 'FAIL'}: {text}"


def report_main(args: argparse.Namespace, stats: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    print(f"\n## {args.tokens} tokens, {args.layers} layers (median of {args.repeats})\n")
    print("\n".join(table(stats, args.tokens, args.layers)))
    bare = stats["bare"]
    out = []
    for config, target in (("qkl", QKL_TARGET), ("summary", SUMMARY_TARGET)):
        ratio = stats[config]["median"] / bare["median"]
        out.append((ratio <= target, f"{LABELS[config]} {ratio:.3f}x bare (target <= {target}x)"))
    for config in ("qkl", "summary"):
        over = stats[config]["extra"] - bare["extra"]
        text = f"{LABELS[config]} peak = bare + {over / MiB:.0f} MiB (target <= bare + {MEMORY_TARGET / MiB:.0f} MiB)"
        out.append((over <= MEMORY_TARGET, text))
    return out


def report_eager(args: argparse.Namespace, stats: dict[str, dict[str, Any]], ran_full: bool) -> None:
    mem = meminfo()
    returned, temps = eager_need(args.tokens, args.layers, args.heads)
    print("\n## Eager output_attentions=True\n")
    print(
        f"At {args.tokens} tokens it needs {args.layers} layers x {args.heads} heads x {args.tokens}^2 x 4 B = "
        f"{returned / GiB:.2f} GiB of returned attentions + {temps / GiB:.2f} GiB of temporaries (one more "
        f"layer's scores, the {args.tokens}^2 float32 mask) = {(returned + temps) / GiB:.2f} GiB over the bare "
        f"forward; this machine has {mem.get('MemTotal', 0) / GiB:.1f} GiB RAM "
        f"({mem.get('MemAvailable', 0) / GiB:.1f} GiB available): "
        + ("it fits and ran in the main table." if ran_full else "not run.")
    )
    print(f"\nAt {args.eager_tokens} tokens, where it fits (median of {args.repeats}):\n")
    print("\n".join(table(stats, args.eager_tokens, args.layers)))
    returned, temps = eager_need(args.eager_tokens, args.layers, args.heads)
    measured = stats["eager"]["extra"] - stats["bare"]["extra"]
    print(
        f"\nThe estimate at {args.eager_tokens} tokens: {(returned + temps) / MiB:.0f} MiB over bare; measured: "
        f"{measured / MiB:.0f} MiB. Eager time {stats['eager']['median'] / stats['summary']['median']:.2f}x "
        "the q/k/lse + summary capture's."
    )


def report_long(
    args: argparse.Namespace, stats: dict[str, dict[str, Any]], c: dict[str, Any]
) -> list[tuple[bool, str]]:
    dense = args.long_layers * args.heads * args.long_tokens**2 * 4
    print(f"\n## {args.long_tokens} tokens, {args.long_layers} layers ({args.long_repeats} run each)\n")
    print("\n".join(table(stats, args.long_tokens, args.long_layers)))
    over = stats["summary"]["extra"] - stats["bare"]["extra"]
    r0, r1 = c["rows"]
    method = 'method="reconstructed"'
    print(
        f"\nEvery layer's full attention would be {dense / GiB:.0f} GiB. Rebuilt from the store ({method}) vs "
        f"a float64 recomputation from the model's own q/k ({c['module']}; the pre-hook's copy of its input "
        f"rows is {c['tap_bytes'] / MiB:.0f} MiB of the peak):"
    )
    print(f"- rows {r0}..{r1}, head {c['head']}, all {c['keys']} keys: max abs diff {c['window_diff']:.2e} "
          f"(largest probability {c['window_max']:.2e}), read in {c['window_s']:.2f} s")  # fmt: skip
    print(f"- rows {r0}..{r1} x keys {r0}..{r1}, every head: max abs diff {c['tile_diff']:.2e}, read in "
          f"{c['tile_s']:.2f} s")  # fmt: skip
    print(f"- stored q / k vs the model's: max abs diff {c['q_diff']:.2e} / {c['k_diff']:.2e}")
    return [
        (over <= MEMORY_TARGET, f"{args.long_tokens}-token q/k/lse + summary completes, peak = bare + "
                                f"{over / MiB:.0f} MiB (target <= bare + {MEMORY_TARGET / MiB:.0f} MiB)"),
        (c["window_diff"] <= TOL, f"window rebuilt = direct recomputation: {c['window_diff']:.2e} (target <= {TOL})"),
        (c["tile_diff"] <= TOL, f"tile rebuilt = direct recomputation: {c['tile_diff']:.2e} (target <= {TOL})"),
    ]  # fmt: skip


def machine(info: dict[str, Any]) -> str:
    mem = meminfo().get("MemTotal", 0) / GiB
    return f"{platform.machine()} {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, {info['versions']}"


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> list[tuple[bool, str]]:
    print(
        f"\nLlama-style, hidden {args.hidden}, {args.heads} heads, intermediate {args.intermediate}, vocab "
        f"{args.vocab}; float32, batch 1, no_grad, use_cache=False; each measurement one forward in its own "
        f"child after a {WARMUP_TOKENS}-token warm-up; time = the whole `with capture(...)` block (forward = "
        "until the model returned, close = draining the writer and closing the store); peak extra = ru_maxrss "
        "- RSS after model load and warm-up, worst repeat; stores: zarr (zstd-1; q, k, lse, row summaries raw), "
        "buffer 1GiB."
    )
    measured = [m for part in ("main", "eager", "long") for ms in results.get(part, {}).values() for m in ms]
    loads = [m["load"] for m in measured]
    print(f"Machine: {machine(info)}; torch.set_num_threads({args.threads}).")
    if loads:
        print(f"1-minute load average after each measurement: {min(loads):.2f}-{max(loads):.2f}.")
    kernels = {m["kernel"] for m in measured if "kernel" in m}
    if kernels:
        print(f"Summary reductions on the CPU: {', '.join(sorted(kernels))}.")
    verdicts: list[tuple[bool, str]] = []
    if "main" in results:
        verdicts += report_main(args, summarize(results["main"]))
    if "eager" in results:
        report_eager(args, summarize(results["eager"]), "eager" in results.get("main", {}))
    if "long" in results:
        long = results["long"]
        verdicts += report_long(args, summarize(long), long["summary"][-1]["check"])
    if "profile" in results:
        p = results["profile"]
        print(f"\n## cProfile of one {LABELS[p['config']]} at {p['tokens']} tokens ({p['seconds']:.2f} s; "
              "model thread only, the writer thread is not profiled)\n")  # fmt: skip
        print(p["profile"])
    print("\nTargets:")
    if args.quick:
        print("- (--quick: smoke sizes, verdicts not meaningful)")
    for ok, text in verdicts:
        print(verdict(ok, text))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke sizes: 1024 / 512 / 2048 tokens, 2 small layers")
    p.add_argument("--parts", default="main,eager,long", help="comma-separated: main, eager, long (default all)")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds of the main and eager sections (default 5: this VM's "
        "forward times move by +-10%% from one minute to the next, the captures' overhead is ~2%%)",
    )
    p.add_argument("--long-repeats", type=int, default=1, help="rounds of the long section (default 1)")
    p.add_argument("--tokens", type=int, default=8192, help="main section length (default 8192)")
    p.add_argument("--layers", type=int, default=12, help="main and eager sections' layers (default 12)")
    p.add_argument("--eager-tokens", type=int, default=2048, help="eager section length (default 2048)")
    p.add_argument("--long-tokens", type=int, default=32768, help="long section length (default 32768)")
    p.add_argument("--long-layers", type=int, default=4, help="long section layers (default 4)")
    p.add_argument("--window", type=int, default=20000, help="first row of the rebuilt window (default 20000)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--intermediate", type=int, default=3072, help="MLP size (default 3072)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    p.add_argument("--profile", choices=sorted(RECORDS), help="also cProfile one capture of this kind at --tokens")
    p.add_argument("--dir", default=None, help="where the stores are written (default: a temporary directory)")
    p.add_argument("--out", metavar="JSON", help="write every measurement to this JSON file")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target fails")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zygote:
        zygote()
        return 0
    if args.quick:
        args.tokens, args.layers, args.eager_tokens, args.long_tokens, args.long_layers = 1024, 2, 512, 2048, 2
        args.hidden, args.heads, args.intermediate, args.vocab, args.window = 256, 4, 512, 1000, 1200
        args.repeats = min(args.repeats, 2)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if (not parts and not args.profile) or set(parts) - {"main", "eager", "long"}:
        p.error(f"--parts: use main, eager and/or long (or none with --profile), got {args.parts!r}")
    if not 0 <= args.window <= args.long_tokens - WINDOW:
        p.error(f"--window {args.window} must leave {WINDOW} rows below --long-tokens {args.long_tokens}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="attnhooks-long-", dir=args.dir)
    args.dir = folder
    results: dict[str, Any] = {}
    zy = Zygote()
    try:
        if "main" in parts:
            need = sum(eager_need(args.tokens, args.layers, args.heads))
            fits = "eager" in parts and need < meminfo().get("MemAvailable", 0) * 0.8
            configs = MAIN + (("eager",) if fits else ())
            results["main"] = section(zy, args, configs, args.tokens, args.layers, args.repeats, log)
        if "eager" in parts:
            results["eager"] = section(zy, args, CONTRAST, args.eager_tokens, args.layers, args.repeats, log)
        if "long" in parts:
            results["long"] = section(
                zy, args, LONG, args.long_tokens, args.long_layers, args.long_repeats, log, args.window
            )
        if args.profile:
            job = {"config": args.profile, "tokens": args.tokens, "model": model_sizes(args, args.layers),
                   "threads": args.threads, "dir": folder, "window": None, "profile": True}  # fmt: skip
            results["profile"] = zy.run(job)
    finally:
        zy.close()
        shutil.rmtree(folder, ignore_errors=True)
    verdicts = report(args, zy.info, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "machine": machine(zy.info), "results": results,
                       "verdicts": [{"pass": ok, "text": text} for ok, text in verdicts]}, f, indent=1)  # fmt: skip
    log(f"total {time.perf_counter() - start:.0f} s")
    return 0 if all(ok for ok, _ in verdicts) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
