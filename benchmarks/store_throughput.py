"""Store throughput: streaming captures to Zarr / HDF5 against writing the same arrays directly.

What is measured
----------------
A Llama-style model (transformers ``LlamaConfig``: hidden 768, 12 layers, 12 heads, 12 KV heads,
intermediate 3072, vocab 1000), randomly initialised (seed 0), float32, ``eval()``, SDPA, batch 1,
every forward ``model(input_ids, use_cache=False)`` under ``torch.inference_mode()``. MB = 10^6
bytes of the records *uncompressed* (q, k and attn as float32, exactly what the store receives),
MiB = 2^20 bytes. Each backend of ``--backends`` is measured:

(a) Throughput, at ``--stream-tokens`` (512) tokens, ``--steps`` (2) forwards per run, record
    ``("attn", "q", "k")`` (180 MiB a forward at 512 tokens), median of ``--repeats`` runs:

    ``drain``  ``attnhooks.capture(model, store=<backend>, record=("attn", "q", "k"))``; the
               backend instance handed to ``store=`` is the library's own backend wrapped in a
               timing proxy that holds the writer thread at its first call until the forwards are
               done. Drain = time from releasing the writer to the end of the ``with`` block
               (every record written, every step committed, the store marked complete), so it is
               the library's whole write path (tensor -> numpy, layout, tables, commits, flushes)
               without the model competing for the 2 cores. The proxy also splits the drain by
               backend verb (record data, per-step tables, lookups, structure, commits).
    ``direct`` the same arrays (taken from an in-memory capture of the same forward) written in a
               plain loop with zarr / h5py into arrays of the same shape, chunks and codec as the
               store the capture wrote (read back from it), one write per record and array, as the
               writer does; h5py with ``libver="latest"``, the file format the library writes.
    Codecs: each backend's default (``backend.default_codec``: zarr zstd level 1; HDF5 zstd level
    1 through hdf5plugin when it is installed, else gzip level 1) and no compression, every
    repeat; HDF5 gzip level 1 (h5py's built-in codec) once more, in the first repeat, when it is
    not the default. "later steps" times everything after the first step's commit (direct: after
    the first step's writes), without the one-time creation of the arrays.
    ``tofile`` the same arrays with ``numpy.ndarray.tofile`` into one raw file per module and array.
    ``live``   the user's view, once (first repeat): ``capture(model, store=path, ...)`` with a
               running writer; wall time of the whole ``with`` block (forwards, writing, closing).
               "added" = live wall - the median forward span of the drain runs (the same capture
               with the writer held).

    Ratio = drain MB/s / direct MB/s with the same codec (target >= 0.8, judged on the whole drain).
(b) Blocking: ``capture(model, store=path, record=("q", "k"), buffer=--qk-buffer)`` (64 MiB, less
    than one forward's 144 MiB at 2048 tokens, so the budget is in its steady state) for
    ``--qk-steps`` (2) forwards at ``--tokens``; blocked = ``cap.writer.budget.blocked_s`` over the
    span of the forwards (from entering the ``with`` to the last forward's return; target < 10%).
    The same fraction is shown for the live runs of (a) and the memory runs of (c).
(c) Peak memory at ``--tokens`` (2048) tokens, each configuration in a fresh subprocess (this script
    with the hidden ``--child`` flag) that builds the model, runs a 16-token warm-up forward,
    records its RSS, runs one forward and reports ``ru_maxrss``: ``bare`` (SDPA forward),
    ``store`` (``capture(model, store=..., record=("attn", "q", "k"), buffer=B)`` for each backend
    and each B of ``--buffers``, 512MiB,1GiB: 2.4 GB of records per forward), ``eager``
    (``attn_implementation="eager"``, ``output_attentions=True``). Target: store peak <= bare
    peak + B. Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (as in capture_overhead.py) so
    that freed tensors leave the RSS.

Every store and file is written under ``--out`` (default: a temporary directory, deleted at the
end) and deleted before each timed run; ``os.sync()`` runs before each timed run so dirty pages of
the previous one are not written back during it. Writes land in the page cache (nothing here
fsyncs): the numbers are those of the write path, not of the disk.

How to run
----------
    python benchmarks/store_throughput.py                  # full run (< 10 minutes on 2 cores)
    python benchmarks/store_throughput.py --quick          # smoke test (< 1 minute)
    python benchmarks/store_throughput.py --backends zarr --repeats 5 --no-memory
    python benchmarks/store_throughput.py --profile        # + cProfile of the writer thread (drain)

Threads: ``torch.set_num_threads(--threads)`` (default 2) in the parent and every child.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

MB = 1e6
MiB = 1 << 20
RECORD = ("attn", "q", "k")
LEAVES = ("q", "k", "attn")
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
EXTRA_CODECS = {"hdf5": ("gzip", 1)}  # measured once when not the backend's default (h5py's classic codec)
RATIO_TARGET = 0.8
BLOCKED_TARGET = 0.10


# -- model ------------------------------------------------------------------------------------
def build(args: argparse.Namespace, impl: str = "sdpa") -> Any:
    from common import llama

    return llama(
        args.hidden,
        args.layers,
        args.heads,
        args.intermediate,
        args.vocab,
        max(4096, args.tokens, args.stream_tokens),
        impl,
    )


def make_input(args: argparse.Namespace, length: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (1, length), generator=g)


def forward(model: Any, ids: Any, **kw: Any) -> None:
    model(ids, use_cache=False, **kw)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def settle(*paths: str) -> None:
    """Before a timed run: no leftovers, no dirty pages of the previous run, no garbage."""
    for path in paths:
        remove(path)
    gc.collect()
    os.sync()


def codec_label(codec: Any) -> str:
    return "none" if codec.name == "none" else f"{codec.name}-{codec.level}"


def codecs_for(backend: str, first_repeat: bool) -> list[tuple[Any, bool]]:
    """(codec, is the default) pairs measured for ``backend``: the library's default, none, and
    (first repeat only) EXTRA_CODECS when they are not the default."""
    from attnhooks.backends import Codec, backend_for

    default = backend_for("x" + SUFFIX[backend]).default_codec
    out = [(default, True), (Codec("none", 0), False)]
    extra = EXTRA_CODECS.get(backend)
    if first_repeat and extra is not None and (default.name, default.level) != extra:
        out.append((Codec(*extra), False))
    return out


def default_label(backend: str) -> str:
    return codec_label(codecs_for(backend, False)[0][0])


# -- a timing, gating proxy around the library's own backend ------------------------------------
def verb_kind(verb: str, path: str) -> str:
    if verb == "write":
        return "record data" if path.rsplit("/", 1)[-1] in (*LEAVES, "lse", "key_valid", "dense") else "tables"
    if verb in ("contains", "children", "shape", "dtype", "attrs", "read"):
        return "lookups"
    if verb in ("create_group", "create_array", "resize"):
        return "structure"
    return "commit (set_attrs/flush/close)"


def timed_backend(engine: Any, location: str) -> Any:
    """``cls.open(location, "w")`` wrapped: every call timed by kind; ``hold()`` makes the writer
    thread wait at its next call until ``release()``."""
    inner = engine.open(location, "w")

    class Timed:
        name = engine.name
        schemes = engine.schemes
        suffixes = engine.suffixes
        default_codec = engine.default_codec

        def __init__(self) -> None:
            self.location = inner.location
            self.readonly = inner.readonly
            self.seconds: dict[str, float] = defaultdict(float)
            self.calls: dict[str, int] = defaultdict(int)
            self._gate = threading.Event()
            self._gate.set()
            self.released_at = 0.0
            self.commits: list[float] = []  # when each step's commit (root "committed") was written

        def hold(self) -> None:
            """From now on the writer thread waits at its next call; the counters start afresh (the
            store's creation, done by the model thread when the capture opens, is not drained work)."""
            self.seconds.clear()
            self.calls.clear()
            self.commits.clear()
            self._gate.clear()

        def release(self) -> None:
            if not self._gate.is_set():
                self.released_at = time.perf_counter()
                self._gate.set()

        def wait(self) -> None:
            self._gate.wait(timeout=900)

        @classmethod
        def open(cls, location: str, mode: str) -> Any:
            raise NotImplementedError("open the engine's backend and wrap it with timed_backend()")

        @classmethod
        def exists(cls, location: str) -> bool:
            return bool(engine.exists(location))

        @classmethod
        def cleanup(cls, location: str) -> list[str]:
            return list(engine.cleanup(location))

        def _call(self, verb: str, path: str, *a: Any) -> Any:
            self.wait()
            kind = verb_kind(verb, path)
            t = time.perf_counter()
            try:
                return getattr(inner, verb)(path, *a)
            finally:
                self.seconds[kind] += time.perf_counter() - t
                self.calls[kind] += 1

        def create_group(self, path: str) -> None:
            self._call("create_group", path)

        def create_array(self, path: str, *a: Any) -> None:
            self._call("create_array", path, *a)

        def contains(self, path: str) -> bool:
            return bool(self._call("contains", path))

        def children(self, path: str) -> list[str]:
            return list(self._call("children", path))

        def shape(self, path: str) -> tuple[int, ...]:
            return tuple(self._call("shape", path))

        def dtype(self, path: str) -> str:
            return str(self._call("dtype", path))

        def resize(self, path: str, shape: tuple[int, ...]) -> None:
            self._call("resize", path, shape)

        def write(self, path: str, selection: Any, value: Any) -> None:
            self._call("write", path, selection, value)

        def read(self, path: str, selection: Any = ()) -> Any:
            return self._call("read", path, selection)

        def attrs(self, path: str) -> dict[str, Any]:
            return dict(self._call("attrs", path))

        def set_attrs(self, path: str, values: dict[str, Any]) -> None:
            self._call("set_attrs", path, values)
            if path == "" and "committed" in values:
                self.commits.append(time.perf_counter())

        def flush(self) -> None:
            self.wait()
            t = time.perf_counter()
            inner.flush()
            self.seconds["commit (set_attrs/flush/close)"] += time.perf_counter() - t

        def close(self) -> None:
            t = time.perf_counter()
            inner.close()
            self.seconds["commit (set_attrs/flush/close)"] += time.perf_counter() - t

    return Timed()


# -- the records, as numpy --------------------------------------------------------------------------
def reference_records(model: Any, ids: Any) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """One in-memory capture of one forward: [(module, {leaf: array [batch, heads, rows, x]})] and
    the record bytes of that forward."""
    import attnhooks

    with attnhooks.capture(model, record=RECORD) as cap:
        forward(model, ids)
    out = []
    for rec in cap.records:
        assert rec.call == 0, "one call per module and forward expected"
        out.append((rec.module, {leaf: getattr(rec, leaf).numpy() for leaf in LEAVES}))
    return out, sum(a.nbytes for _, arrs in out for a in arrs.values())


def store_layout(path: str, backend: str, modules: list[str]) -> dict[tuple[str, str], tuple[Any, Any]]:
    """(module, leaf) -> (shape, chunks) of the arrays the capture wrote, read with the engine."""
    from attnhooks.schema import module_path

    layout = {}
    if backend == "zarr":
        import zarr

        root = zarr.open_group(path, mode="r")
        for m in modules:
            for leaf in LEAVES:
                arr = root[module_path(m, leaf)]
                layout[(m, leaf)] = (tuple(arr.shape), tuple(arr.chunks))
    else:
        import h5py

        with h5py.File(path, "r") as f:
            for m in modules:
                for leaf in LEAVES:
                    ds = f[module_path(m, leaf)]
                    layout[(m, leaf)] = (tuple(ds.shape), tuple(ds.chunks))
    return layout


def check_store(path: str, steps: int, records: list[tuple[str, dict[str, Any]]]) -> None:
    """The capture stored what it claims: every step committed, the last step's q/k bit-equal."""
    import numpy as np

    import attnhooks

    with attnhooks.open_store(path) as st:
        assert st.status == "complete" and st.steps == list(range(steps)), (st.status, st.steps)
        module, arrays = records[-1]
        assert np.array_equal(st.q(module, step=steps - 1), arrays["q"][0]), f"{path}: q differs"
        assert np.array_equal(st.k(module, step=steps - 1), arrays["k"][0]), f"{path}: k differs"


# -- direct writes ----------------------------------------------------------------------------------
def direct_zarr(path: str, records: list, steps: int, layout: dict, codec: Any) -> float:
    """Returns when the first step was written (for the later-steps rate)."""
    import zarr
    from zarr.codecs import GzipCodec, ZstdCodec

    from attnhooks.schema import module_path

    known = {"zstd": ZstdCodec, "gzip": GzipCodec}
    if codec.name != "none" and codec.name not in known:
        raise SystemExit(f"no direct zarr baseline for codec {codec.name!r}")
    compressors = [known[codec.name](level=codec.level)] if codec.name != "none" else None
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    arrays = {
        key: root.create_array(
            module_path(*key), shape=shape, chunks=chunks, dtype="float32", fill_value=0.0, compressors=compressors
        )
        for key, (shape, chunks) in layout.items()
    }
    first = 0.0
    for step in range(steps):
        for module, leaves in records:
            for leaf, value in leaves.items():
                b, h, n, x = value.shape
                arrays[(module, leaf)][step, 0, 0:b, 0:h, 0:n, 0:x] = value
        first = first or time.perf_counter()
    return first


def h5py_filter(codec: Any) -> dict[str, Any]:
    """The h5py filter options attnhooks' HDF5 backend uses for ``codec`` (the same baseline)."""
    from attnhooks.backends.hdf5 import _filter

    return _filter(codec)


def direct_h5py(path: str, records: list, steps: int, layout: dict, codec: Any) -> float:
    import h5py

    from attnhooks.schema import module_path

    opts = h5py_filter(codec)
    first = 0.0
    with h5py.File(path, "w-", libver="latest") as f:  # the file format the library writes
        arrays = {
            key: f.create_dataset(module_path(*key), shape=shape, chunks=chunks, dtype="float32", **opts)
            for key, (shape, chunks) in layout.items()
        }
        for step in range(steps):
            for module, leaves in records:
                for leaf, value in leaves.items():
                    b, h, n, x = value.shape
                    arrays[(module, leaf)][step, 0, 0:b, 0:h, 0:n, 0:x] = value
            first = first or time.perf_counter()
    return first


def direct_tofile(path: str, records: list, steps: int) -> None:
    os.makedirs(path)
    files = {(m, leaf): open(os.path.join(path, f"{m}.{leaf}.f32"), "wb") for m, arrs in records for leaf in arrs}  # noqa: SIM115
    try:
        for _ in range(steps):
            for module, leaves in records:
                for leaf, value in leaves.items():
                    value.tofile(files[(module, leaf)])
    finally:
        for fh in files.values():
            fh.close()


# -- (a) and (b): this process -----------------------------------------------------------------------
def drain_run(
    model: Any, ids: Any, args: argparse.Namespace, backend: str, path: str, codec: Any, default: bool, budget: int
) -> dict:
    """Capture with the writer held until the forwards are done, then time the writer alone."""
    import attnhooks
    from attnhooks.backends import backend_for

    settle(path)
    proxy = timed_backend(backend_for(path, backend), path)
    compression = None if default else codec  # None: what a user gets without asking
    profile = None
    t0 = time.perf_counter()
    try:
        with attnhooks.capture(model, store=proxy, record=RECORD, buffer=budget, compression=compression) as cap:
            writer = cap.writer
            if args.profile and backend not in args.profiled:
                args.profiled.add(backend)
                profile = profile_writer(writer, proxy)
            proxy.hold()
            for _ in range(args.steps):
                forward(model, ids)
            t_fwd = time.perf_counter()
            proxy.release()
    finally:
        proxy.release()
    t_end = time.perf_counter()
    if profile is not None:
        args.profiles.append((backend, codec_label(codec), profile_text(profile)))
    return {
        "fwd": t_fwd - t0,
        "drain": t_end - proxy.released_at,
        "later": t_end - proxy.commits[0] if args.steps > 1 else float("nan"),
        "bytes": writer.bytes_written,
        "split": dict(proxy.seconds),
        "calls": dict(proxy.calls),
        "blocked": writer.budget.blocked_s,
    }


def live_run(model: Any, ids: Any, steps: int, path: str, record: tuple[str, ...], buffer: Any) -> dict:
    import attnhooks

    settle(path)
    t0 = time.perf_counter()
    with attnhooks.capture(model, store=path, record=record, buffer=buffer) as cap:
        writer = cap.writer
        for _ in range(steps):
            forward(model, ids)
        t_fwd = time.perf_counter()
    t_end = time.perf_counter()
    return {
        "wall": t_end - t0,
        "fwd": t_fwd - t0,
        "tail": t_end - t_fwd,
        "blocked": writer.budget.blocked_s,
        "budget_peak": writer.budget.peak,
        "bytes": writer.bytes_written,
    }


def profile_writer(writer: Any, proxy: Any) -> Any:
    """A cProfile of the writer thread: its message handlers run under a profiler from now on
    (cProfile only sees the thread that enables it, so each handler enables it around itself),
    from the release of the proxy's gate on."""
    import cProfile

    profile = cProfile.Profile()
    for name in ("_on_begin", "_on_record", "_on_tokens", "_on_commit", "_finish"):
        method = getattr(writer, name)

        def wrapped(*a: Any, _m: Callable[..., Any] = method) -> Any:
            proxy.wait()
            profile.enable()
            try:
                return _m(*a)
            finally:
                profile.disable()

        setattr(writer, name, wrapped)  # the writer dispatches through getattr(self, ...)
    return profile


def profile_text(profile: Any) -> str:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


def measure_throughput(args: argparse.Namespace, model: Any, log: Callable[[str], None]) -> dict:
    import torch

    ids = make_input(args, args.stream_tokens)
    res: dict[str, Any] = {"runs": defaultdict(list)}
    with torch.inference_mode():
        forward(model, ids)  # warm-up at this length
        records, step_bytes = reference_records(model, ids)
        total = step_bytes * args.steps
        res["bytes"] = total
        budget = total + 256 * MiB  # the held writer must not make the model wait
        layouts = {}
        for r in range(args.repeats):
            for backend in args.backends:
                path = os.path.join(args.out, f"a-capture{SUFFIX[backend]}")
                codecs = codecs_for(backend, r == 0)
                for codec, default in codecs:
                    label = codec_label(codec)
                    d = drain_run(model, ids, args, backend, path, codec, default, budget)
                    if d["bytes"] != total:
                        raise RuntimeError(f"writer wrote {d['bytes']} bytes of records, expected {total}")
                    if backend not in layouts:
                        check_store(path, args.steps, records)
                        layouts[backend] = store_layout(path, backend, [m for m, _ in records])
                    res["runs"][(backend, "drain", label)].append(d)
                    rate = total / MB / d["drain"]
                    log(f"  a r{r + 1} {backend} drain {label:7s} {d['drain']:6.2f} s  ({rate:6.1f} MB/s)")
                if r == 0:  # once: it is the user's view, not the ratio, and it takes the longest
                    lv = live_run(model, ids, args.steps, path, RECORD, "1GiB")
                    res["runs"][(backend, "live", default_label(backend))].append(lv)
                    log(f"  a r{r + 1} {backend} live  {lv['wall']:6.2f} s  (blocked {lv['blocked']:.2f} s)")
                direct = direct_zarr if backend == "zarr" else direct_h5py
                for codec, _ in codecs:
                    label = codec_label(codec)
                    dpath = os.path.join(args.out, f"a-direct{SUFFIX[backend]}")
                    settle(path, dpath)
                    t0 = time.perf_counter()
                    first = direct(dpath, records, args.steps, layouts[backend], codec)
                    t_end = time.perf_counter()
                    dt = t_end - t0
                    res["runs"][(backend, "direct", label)].append({"drain": dt, "later": t_end - first})
                    log(f"  a r{r + 1} {backend} direct {label:7s} {dt:6.2f} s  ({total / MB / dt:6.1f} MB/s)")
                    remove(dpath)
            tpath = os.path.join(args.out, "a-tofile")
            settle(tpath)
            t0 = time.perf_counter()
            direct_tofile(tpath, records, args.steps)
            dt = time.perf_counter() - t0
            res["runs"][("raw", "tofile", "none")].append({"drain": dt})
            log(f"  a r{r + 1} numpy.tofile   {dt:6.2f} s  ({total / MB / dt:6.1f} MB/s)")
            remove(tpath)
    return res


def measure_blocking(args: argparse.Namespace, model: Any, log: Callable[[str], None]) -> dict:
    import torch

    ids = make_input(args, args.tokens)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        forward(model, ids)  # warm-up at this length
        for backend in args.backends:
            path = os.path.join(args.out, f"b-capture{SUFFIX[backend]}")
            run = live_run(model, ids, args.qk_steps, path, ("q", "k"), args.qk_buffer)
            remove(path)
            out[backend] = run
            log(
                f"  b {backend} q,k x{args.qk_steps}: forwards {run['fwd']:.2f} s, blocked {run['blocked']:.2f} s, "
                f"tail {run['tail']:.2f} s"
            )
    return out


# -- (c): memory, one child process per configuration --------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(args: argparse.Namespace) -> None:
    import torch

    import attnhooks

    torch.set_num_threads(args.threads)
    config, backend, buffer = args.child
    model = build(args, "eager" if config == "eager" else "sdpa")
    ids = make_input(args, args.tokens)
    path = os.path.join(args.out, f"c-{backend}-{buffer}{SUFFIX.get(backend, '')}")
    if config == "store":
        __import__("zarr" if backend == "zarr" else "h5py")  # the engine is in the baseline, like the model
        remove(path)
    result: dict[str, Any] = {"config": config, "backend": backend, "buffer": buffer}
    with torch.inference_mode():
        forward(model, ids[:, :16])  # one-time lazy initialisation belongs to the baseline
        gc.collect()
        result["base_rss"], result["base_peak"] = rss_bytes(), maxrss_bytes()
        t0 = time.perf_counter()
        if config == "bare":
            forward(model, ids)
        elif config == "eager":
            out = model(ids, use_cache=False, output_attentions=True)
            assert len(out.attentions) == args.layers, "eager output_attentions returned no attentions"
            del out
        else:
            with attnhooks.capture(model, store=path, record=RECORD, buffer=buffer) as cap:
                writer = cap.writer
                forward(model, ids)
                result["fwd"] = time.perf_counter() - t0
            result["blocked"] = writer.budget.blocked_s
            result["budget_peak"] = writer.budget.peak
            result["limit"] = writer.budget.limit
            result["bytes"] = writer.bytes_written
        result["wall"] = time.perf_counter() - t0
    result["peak"] = maxrss_bytes()
    if config == "store" and not args.keep_out:
        remove(path)
    print("@@RESULT " + json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    configs = [("bare", "-", "-")]
    configs += [("store", b, buf) for b in args.backends for buf in args.buffers]
    configs.append(("eager", "-", "-"))
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), **os.environ}
    cmds = [[sys.executable, os.path.abspath(__file__), "--child", *config, *passthrough(args)] for config in configs]
    # One child at a time, so that none competes with another for the CPU; --quick starts them all at
    # once (its sizes are tiny and the start-up of torch dominates).
    width = len(cmds) if args.quick else 1
    results = []
    for first in range(0, len(cmds), width):
        os.sync()
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for cmd in cmds[first : first + width]
        ]
        for config, proc in zip(configs[first : first + width], procs):
            stdout, stderr = proc.communicate()
            found = [json.loads(x[9:]) for x in stdout.splitlines() if x.startswith("@@RESULT ")]
            if not found:
                raise RuntimeError(f"child {config} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
            m = found[0]
            results.append(m)
            log(
                f"  c {' '.join(config):24s} peak {m['peak'] / MiB:7.0f} MiB (base RSS {m['base_rss'] / MiB:.0f}), "
                f"{m['wall']:.1f} s"
            )
    return results


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--threads", str(args.threads), "--layers", str(args.layers), "--hidden", str(args.hidden),
        "--heads", str(args.heads), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
        "--tokens", str(args.tokens), "--out", args.out, *(["--keep-out"] if args.keep_out else []),
    ]  # fmt: skip


# -- report -------------------------------------------------------------------------------------------
def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(args: argparse.Namespace, a: dict | None, b: dict | None, c: list[dict] | None) -> bool:
    verdicts: list[tuple[str, bool]] = []
    print()
    print(
        f"Llama-style {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}; float32, batch 1, SDPA, inference_mode, use_cache=False."
    )
    print(f"Machine: {machine()}.")
    print(
        f"Other load on the machine: 1-min load average {args.load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; CPU pressure (PSI some avg300) {args.psi_start} -> "
        f"{cpu_pressure()}. Total {args.elapsed():.0f} s."
    )
    if a is not None:
        verdicts += report_throughput(args, a)
    if a is not None or b is not None:
        verdicts += report_blocking(args, a, b, c)
    if c:
        verdicts += report_memory(args, c)
    print()
    print(EXPLANATION)
    print()
    if args.quick:
        print("- (--quick: smoke model and sizes, verdicts not meaningful)")
    for text, ok in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    for backend, codec, text in args.profiles:
        print(f"\ncProfile of the writer thread, {backend} {codec} drain (cumulative):\n{text}")
    return all(ok for _, ok in verdicts)


def report_throughput(args: argparse.Namespace, a: dict) -> list[tuple[str, bool]]:
    verdicts = []
    total, runs = a["bytes"], a["runs"]
    later_bytes = total * (args.steps - 1) / args.steps
    print()
    print(
        f"(a) Throughput: record=('attn','q','k'), {args.stream_tokens} tokens x {args.steps} forwards = "
        f"{total / MB:.0f} MB of records; median of the runs. Later steps = everything after the first step's "
        f"commit (the first step also creates every array), {later_bytes / MB:.0f} MB."
    )
    print()
    print(row("backend", "path", "codec", "runs", "median s", "MB/s", "vs direct", "later steps MB/s", "vs direct"))
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for backend in args.backends:
        engine = "zarr" if backend == "zarr" else "h5py"
        labels = [label for (be, kind, label) in runs if be == backend and kind == "direct"]
        for label in labels:
            direct, drain = runs[(backend, "direct", label)], runs[(backend, "drain", label)]
            d_s, c_s = med(direct, "drain"), med(drain, "drain")
            d_l, c_l = med(direct, "later"), med(drain, "later")
            ratio, later = d_s / c_s, d_l / c_l
            cells = (len(drain), f"{c_s:.2f}", f"{total / MB / c_s:.1f}", f"{ratio:.2f}x")
            print(row(backend, "attnhooks capture->store, writer drain", label, *cells,
                      f"{later_bytes / MB / c_l:.1f}", f"{later:.2f}x"))  # fmt: skip
            cells = (len(direct), f"{d_s:.2f}", f"{total / MB / d_s:.1f}", "1.00x", f"{later_bytes / MB / d_l:.1f}")
            print(row(backend, f"direct {engine} loop", label, *cells, "1.00x"))
            text = (
                f"{backend} {label}: capture->store drain at {ratio:.2f}x of direct {engine} (target >= {RATIO_TARGET})"
            )
            verdicts.append((f"{text}; later steps {later:.2f}x", ratio >= RATIO_TARGET))
        label = default_label(backend)
        wall = med(runs[(backend, "live", label)], "wall")
        fwd = med(runs[(backend, "drain", label)], "fwd")
        added = wall - fwd
        rate = f"{total / MB / added:.1f} MB/s" if added > 0.05 else "fully overlapped"
        note = f"store added {added:.2f} s to the {fwd:.2f} s of forwards ({rate})"
        path = "attnhooks live: with-block wall (forwards + writer)"
        print(row(backend, path, label, 1, f"{wall:.2f}", f"{total / MB / wall:.1f}", note, "", ""))
    tofile = runs[("raw", "tofile", "none")]
    raw = med(tofile, "drain")
    print(row("-", "numpy.tofile", "none", len(tofile), f"{raw:.2f}", f"{total / MB / raw:.1f}", "-", "", ""))
    print()
    for backend in args.backends:
        label = default_label(backend)
        d = sorted(runs[(backend, "drain", label)], key=lambda r: r["drain"])[len(runs[(backend, "drain", label)]) // 2]
        split = sorted(d["split"].items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{k} {v:.2f} s ({d['calls'].get(k, 0)} calls)" for k, v in split)
        own = d["drain"] - sum(d["split"].values())
        print(
            f"- {backend} {label} drain {d['drain']:.2f} s (the median run) by backend verb: {parts}; "
            f"attnhooks' own Python {own:.2f} s."
        )
    return verdicts


def report_blocking(args: argparse.Namespace, a: dict | None, b: dict | None, c: list[dict] | None) -> list:
    verdicts = []
    print()
    print("(b) Blocking: model-thread time blocked on the writer's budget / the forwards' span.")
    print()
    print(
        row("backend", "record", "tokens", "forwards", "buffer", "forwards s", "blocked s", "blocked", "close tail s")
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for backend in args.backends:
        if b is not None:
            r = b[backend]
            frac = r["blocked"] / r["fwd"]
            cells = (args.tokens, args.qk_steps, args.qk_buffer, f"{r['fwd']:.2f}", f"{r['blocked']:.2f}")
            print(row(backend, "q,k", *cells, f"{frac:.1%}", f"{r['tail']:.2f}"))
            text = f"{backend} q,k every forward at {args.tokens} tokens: blocked {frac:.1%} of the forwards"
            verdicts.append((f"{text} (target < {BLOCKED_TARGET:.0%})", frac < BLOCKED_TARGET))
        if a is not None:
            live = a["runs"][(backend, "live", default_label(backend))]
            fwd, blk, tail = med(live, "fwd"), med(live, "blocked"), med(live, "tail")
            cells = (args.stream_tokens, args.steps, "1GiB", f"{fwd:.2f}", f"{blk:.2f}", f"{blk / fwd:.1%}")
            print(row(backend, "attn,q,k", *cells, f"{tail:.2f}"))
        for m in c or []:
            if m["config"] == "store" and m["backend"] == backend:
                cells = (args.tokens, 1, m["buffer"], f"{m['fwd']:.2f}", f"{m['blocked']:.2f}")
                print(row(backend, "attn,q,k", *cells, f"{m['blocked'] / m['fwd']:.1%}", f"{m['wall'] - m['fwd']:.2f}"))
    bare = next((m for m in c or [] if m["config"] == "bare"), None)
    if bare is not None:
        print(f"\nBare SDPA forward at {args.tokens} tokens (fresh process, from (c)): {bare['wall']:.2f} s.")
    return verdicts


def report_memory(args: argparse.Namespace, c: list[dict]) -> list[tuple[str, bool]]:
    verdicts = []
    bare = next(m for m in c if m["config"] == "bare")
    print()
    print(f"(c) Peak memory at {args.tokens} tokens, one forward, fresh subprocess per row.")
    print()
    head = ("config", "buffer", "wall s", "peak RSS MiB", "peak - bare peak MiB", "budget MiB", "budget peak MiB")
    print(row(*head, "within budget"))
    print("|---|---|---:|---:|---:|---:|---:|---|")
    labels = {"bare": "bare SDPA forward", "eager": "HF eager output_attentions=True"}
    for m in c:
        extra = (m["peak"] - bare["peak"]) / MiB
        cells = (m["buffer"], f"{m['wall']:.1f}", f"{m['peak'] / MiB:.0f}", f"{extra:+.0f}")
        if m["config"] == "store":
            limit = m["limit"] / MiB
            ok = extra <= limit
            text = f"{m['backend']} buffer={m['buffer']}: peak {extra:.0f} MiB over bare vs budget {limit:.0f} MiB"
            verdicts.append((text, ok))
            budget = (f"{limit:.0f}", f"{m['budget_peak'] / MiB:.0f}", "yes" if ok else "NO")
            print(row(f"capture->store {m['backend']}", *cells, *budget))
        else:
            print(row(labels[m["config"]], *cells, "-", "-", "-"))
    eager = next(m for m in c if m["config"] == "eager")
    ratio = eager["peak"] / bare["peak"]
    extra_ratio = (eager["peak"] - eager["base_rss"]) / max(bare["peak"] - bare["base_rss"], 1)
    print(
        f"\nEager output_attentions peak RSS = {ratio:.2f}x the bare forward's (expected ~4x); its memory above "
        f"the loaded model = {extra_ratio:.1f}x the bare forward's."
    )
    return verdicts


EXPLANATION = """\
What the numbers mean. MB/s is uncompressed record bytes (q, k, attn float32) per second. "writer
drain" is attnhooks' whole write path (tensor to numpy, array layout, per-step tables, commit
flushes, closing) timed alone: the writer thread is held until the forwards are done, then
released. "direct" writes the same arrays with the same shapes, chunks and codec in a plain loop,
so "vs direct" (target >= 0.8x) is the share of the engine's own speed the library keeps; "later
steps" leaves out the first step, which also creates every array (HDF5 compresses chunks that fit
its chunk cache only when it flushes or closes, which the library does every step and the direct
loop once at the end: judge HDF5 on the whole drain). The per-verb split says where a
drain went ("record data": the engine compressing and writing the arrays; "tables", "lookups",
"structure", "commit": attnhooks' bookkeeping through the same engine). "live" is what a user
waits for: forwards and writer together on 2 cores, where the writer's compression competes with
torch's threads ("added" = live wall - the same forwards with the writer held; on a shared
machine this difference is within the noise of the forwards). "blocked" is
cap.writer.budget.blocked_s over the span of the forwards: time the model thread waited for
budget because the writer was behind (target < 10% when it keeps up). In (c), "peak - bare peak"
is the capture's extra high-water RSS over the bare SDPA forward; the target is that it stays
within the buffer budget, which bounds the record bytes staged at once ("budget peak"); the eager
row shows what output_attentions=True costs for the same attention."""


def cpu_pressure() -> str:
    """Share of time some task waited for a CPU over the last 5 minutes (Linux PSI), or n/a."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[3].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"


def machine() -> str:
    import torch
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("zarr", "h5py", "numcodecs"):
        with contextlib.suppress(ImportError):
            versions.append(f"{name} {__import__(name).__version__}")
    return (
        f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 1 minute)")
    p.add_argument("--out", help="directory for the stores (default: a temporary one, deleted at the end)")
    p.add_argument("--backends", default="zarr,hdf5", help="comma-separated: zarr, hdf5 (default both)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens for (b) and the memory runs (c) (default 2048)")
    p.add_argument("--stream-tokens", type=int, default=512, help="tokens for the throughput runs (a) (default 512)")
    p.add_argument("--steps", type=int, default=2, help="forwards per throughput run (a) (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="throughput runs per configuration (default 2)")
    p.add_argument("--qk-steps", type=int, default=2, help="forwards in the q,k blocking run (b) (default 2)")
    p.add_argument("--qk-buffer", default="64MiB", help="buffer of the q,k blocking run (b) (default 64MiB)")
    p.add_argument("--buffers", default="512MiB,1GiB", help="buffers of the memory runs (c) (default 512MiB,1GiB)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip (c), the memory subprocesses")
    p.add_argument("--no-throughput", action="store_true", help="skip (a) and (b)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the writer thread in one drain")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target fails")
    p.add_argument("--layers", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=768, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--intermediate", type=int, default=3072, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--keep-out", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "BACKEND", "BUFFER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in SUFFIX]
    if unknown or not args.backends:
        p.error(f"--backends: use zarr and/or hdf5, got {args.backends}")
    args.buffers = [b.strip() for b in args.buffers.split(",") if b.strip()]
    if args.quick:
        args.layers, args.hidden, args.heads, args.intermediate = 2, 128, 4, 256
        args.tokens, args.stream_tokens, args.steps, args.repeats, args.qk_steps = 256, 128, 2, 1, 2
        args.buffers, args.qk_buffer = ["4MiB"], "512KiB"
    args.profiles, args.profiled = [], set()
    if args.child:
        child(args)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    args.elapsed = lambda: time.perf_counter() - start
    args.load_start, args.psi_start = os.getloadavg()[0], cpu_pressure()
    temp = args.out is None
    args.out = tempfile.mkdtemp(prefix="attnhooks-bench-") if temp else os.path.abspath(args.out)
    args.keep_out = not temp
    os.makedirs(args.out, exist_ok=True)
    log(f"stores under {args.out}; load average {os.getloadavg()[0]:.2f}")
    try:
        c = None if args.no_memory else measure_memory(args, log)
        a = b = None
        if not args.no_throughput:
            import torch

            torch.set_num_threads(args.threads)
            model = build(args, "sdpa")
            a = measure_throughput(args, model, log)
            b = measure_blocking(args, model, log)
        ok = report(args, a, b, c)
    finally:
        if temp:
            shutil.rmtree(args.out, ignore_errors=True)
    log(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
