"""Back-pressure and write errors of the streaming stores.

A deliberately slow backend (a :class:`MemoryBackend` that sleeps in ``write``) lets the model run
ahead of the writer thread: ``when_full="block"`` must hold the staged bytes (and the process's
memory) within ``buffer=`` and lose nothing; ``when_full="drop"`` must drop whole steps and say
which. Backends that fail (a full device, a generic exception, a read-only or impossible location,
a real full tmpfs) must surface as typed errors in the caller's thread, never a hang, and leave the
steps committed before the failure readable. Every capture body runs in a thread joined with a
timeout, and no ``attnhooks-writer`` thread may outlive its capture.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import itertools
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import attnhooks
from attnhooks.backends import register_backend
from attnhooks.backends.memory import MemoryBackend
from tests.integration import store_worker as worker

DATA = ("q", "k", "attn", "lse")  # the leaves whose writes are slow; the small tables are not
TIMEOUT = 60.0
STEPS = 200  # the worker's default run
_ids = itertools.count()


# -- backends -------------------------------------------------------------------------------------
def _is_data(path: str) -> bool:
    """A tensor array: a module's ``q`` / ``attn`` ..., or a stack of them (``stacks/q.0``)."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf in DATA or (path.startswith("stacks/") and leaf.split(".")[0] in DATA)


class SlowMemory(MemoryBackend):
    """An in-memory store whose writes of tensors take ``delay`` seconds each."""

    name: ClassVar[str] = "slow-memory-test"
    schemes: ClassVar[tuple[str, ...]] = ("slowmem",)
    delay: ClassVar[float] = 0.004

    def write(self, path: str, selection: Any, value: np.ndarray) -> None:
        if _is_data(path):
            time.sleep(self.delay)
        super().write(path, selection, value)


class SlowSink(MemoryBackend):
    """Like :class:`SlowMemory`, but the tensors are thrown away after the wait (only their shapes
    are kept), so that the process's memory shows what the capture stages, not what it stored."""

    name: ClassVar[str] = "slow-sink-test"
    schemes: ClassVar[tuple[str, ...]] = ("slowsink",)
    delay: ClassVar[float] = 0.005

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shapes: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _data(path: str) -> bool:
        return _is_data(path)

    def create_array(self, path: str, shape: tuple[int, ...], dtype: str, *args: Any) -> None:
        if self._data(path):
            self.shapes[path] = tuple(shape)
            shape = (0,) * len(shape)
        super().create_array(path, shape, dtype, *args)

    def shape(self, path: str) -> tuple[int, ...]:
        return self.shapes.get(path) or super().shape(path)

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        if path in self.shapes:
            self.shapes[path] = tuple(shape)
        else:
            super().resize(path, shape)

    def write(self, path: str, selection: Any, value: np.ndarray) -> None:
        if path in self.shapes:
            time.sleep(self.delay)
        else:
            super().write(path, selection, value)


class Failing(MemoryBackend):
    """Writes fail with ``error()`` once ``after`` writes have succeeded (set per test)."""

    name: ClassVar[str] = "failing-memory-test"
    schemes: ClassVar[tuple[str, ...]] = ("failmem",)
    after: ClassVar[int] = 10**9
    error: ClassVar[Callable[[], BaseException]] = lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    def write(self, path: str, selection: Any, value: np.ndarray) -> None:
        self.writes += 1
        if self.writes > self.after:
            raise type(self).error()
        super().write(path, selection, value)


for _cls in (SlowMemory, SlowSink, Failing):
    register_backend(_cls)


@pytest.fixture
def location(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """``location("slowmem")`` -> a fresh ``slowmem://...`` URL, forgotten after the test."""
    made: list[str] = []

    def make(scheme: str) -> str:
        made.append(f"{scheme}://{request.node.name}-{next(_ids)}")
        return made[-1]

    yield make
    for url in made:
        MemoryBackend.delete(url)


# -- helpers --------------------------------------------------------------------------------------
def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "attnhooks-writer" and t.is_alive()}


def in_thread(body: Callable[[], Any], timeout: float = TIMEOUT) -> tuple[Any, BaseException | None]:
    """Run ``body`` in a thread; fail if it hangs, return (its result, the error it raised)."""
    before = writer_threads()
    box: dict[str, Any] = {}
    threads = torch.get_num_threads()  # a new thread starts with OpenMP's default, not the caller's count

    def target() -> None:
        torch.set_num_threads(threads)
        try:
            box["result"] = body()
        except BaseException as err:
            box["error"] = err

    caller = threading.Thread(target=target, name="store-pressure-caller", daemon=True)
    start = time.perf_counter()
    caller.start()
    caller.join(timeout)
    assert not caller.is_alive(), f"the capture hung for {timeout}s"
    assert time.perf_counter() - start < timeout
    left = writer_threads() - before
    assert not left, f"writer thread(s) still running after the capture: {left}"
    return box.get("result"), box.get("error")


class Reference:
    """In-memory captures of the worker model's steps, ``ref[step, module] -> Record``, made on
    first use 32 steps at a time. ``threads`` is torch's thread count for them (``None``: the
    caller's): the last bits of some probabilities depend on it (seen on AMD EPYC), so a reference
    is computed with the thread count of the capture it is compared with, bit for bit."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.model = worker.build_model()
        self.records: dict[tuple[int, str], attnhooks.Record] = {}

    def __getitem__(self, key: tuple[int, str]) -> attnhooks.Record:
        if key not in self.records:
            first = key[0] - key[0] % 32
            before = torch.get_num_threads()
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            try:
                with torch.no_grad(), attnhooks.capture(self.model, record=worker.RECORD) as cap:
                    for step in range(first, first + 32):
                        cap.step = step
                        self.model(worker.inputs(step))
            finally:
                torch.set_num_threads(before)
            self.records.update({(rec.step, rec.module): rec for rec in cap.records})
        return self.records[key]


@pytest.fixture(scope="module")
def reference() -> Reference:
    """For the captures this process runs: torch's thread count as the suite set it."""
    return Reference()


@pytest.fixture(scope="module")
def worker_reference() -> Reference:
    """For the stores :mod:`store_worker` writes in a subprocess: one torch thread, as it runs."""
    return Reference(threads=1)


def assert_steps_equal(st: attnhooks.Store, steps: list[int], ref: Reference) -> None:
    """Every tensor of every listed step equals the in-memory capture, bit for bit."""
    for step in steps:
        for module in worker.MODULES:
            rec = ref[step, module]
            assert st.calls(module, step) == 1, f"step {step} {module}: {st.calls(module, step)} calls"
            for b in range(worker.BATCH):
                for name, got in (
                    ("attn", st.attention(module, step=step, sample=b)),
                    ("q", st.q(module, step=step, sample=b)),
                    ("k", st.k(module, step=step, sample=b)),
                    ("lse", st.lse(module, step=step, sample=b)),
                ):
                    assert np.array_equal(got, getattr(rec, name)[b].numpy()), f"step {step} {module} {b} {name}"


def record_bytes(step: int) -> int:
    """Bytes the budget admits for one call of the worker model at ``step`` (q, k, attn, lse)."""
    b, h, n, d = worker.BATCH, worker.HEADS, worker.seq_len(step), worker.D_MODEL // worker.HEADS
    return 4 * (2 * b * h * n * d + b * h * n * n + b * h * n)


# -- back-pressure --------------------------------------------------------------------------------
def test_block_bounds_staging_and_keeps_every_step(location, reference, monkeypatch):
    monkeypatch.setattr(SlowMemory, "delay", 0.02)  # ~80 ms per record: far slower than the forwards
    url, steps, buffer = location("slowmem"), 30, 16 * 1024
    assert max(record_bytes(s) for s in range(steps)) <= buffer < 3 * max(record_bytes(s) for s in range(steps))
    model = worker.build_model()

    def body() -> Any:
        with (
            torch.no_grad(),
            attnhooks.capture(model, record=worker.RECORD, store=url, buffer=buffer, when_full="block") as cap,
        ):
            writer = cap.writer
            for step in range(steps):
                model(worker.inputs(step))
                assert writer.budget.used <= buffer
        return writer

    writer, error = in_thread(body)
    assert error is None, error
    assert writer.budget.limit == buffer
    assert 0 < writer.budget.peak <= buffer, f"peak staged {writer.budget.peak} B over the {buffer} B buffer"
    assert writer.budget.blocked_s > 0, "the model never waited: the test did not exercise back-pressure"
    assert writer.dropped == 0
    st = attnhooks.open_store(url)
    assert st.steps == list(range(steps)) and st.status == "complete" and st.dropped == 0
    assert_steps_equal(st, st.steps, reference)


def _release_free_heap() -> None:
    """Give the allocator's free memory back to the system (glibc's ``malloc_trim``), so that a
    measure starts from what is live: memory freed by earlier tests stays resident in malloc's
    arenas and would absorb the growth being measured (seen in CI: 0.0 MiB growth unbounded)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the measure goes by what it sees
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_growth(body: Callable[[], Any]) -> tuple[int, Any]:
    """Highest resident memory above the starting point while ``body`` runs (sampled each ms)."""
    gc.collect()  # earlier tests' garbage is not freed in the middle of the measure
    _release_free_heap()
    base, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result, error = in_thread(body)
    finally:
        running[0] = False
        sampler.join()
    assert error is None, error
    return max(peak[0], _rss()) - base, result


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident memory")
def test_block_bounds_process_memory(location):
    """With 1 MiB of attention per call, 60 steps and a 3 MiB buffer, the process grows by about
    the buffer; the same capture without a bound (buffer 1 GiB) grows by most of the 60 MiB."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 256, 16)  # attn [1, 4, 256, 256] float32: 1 MiB per call
    steps, buffer, margin = 60, 3 << 20, 16 << 20

    def body(buffer: int, url: str) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), attnhooks.capture(layer, record=worker.RECORD, store=url, buffer=buffer) as cap:
                writer = cap.writer
                for _ in range(steps):
                    layer(x)
            return writer

        return run

    with torch.no_grad():
        for _ in range(3):
            layer(x)  # warm the allocator
    in_thread(body(buffer, location("slowsink")))  # and the capture machinery
    bounded, writer = _peak_rss_growth(body(buffer, location("slowsink")))
    assert writer.budget.peak <= buffer and writer.budget.blocked_s > 0
    assert attnhooks.open_store(writer.backend.location).committed == steps
    unbounded, writer = _peak_rss_growth(body(1 << 30, location("slowsink")))
    # without a bound the writer falls behind (else nothing is tested); how far depends on the machine's
    # load: 28-60 MiB of the 60 MiB were seen on 2 cores
    assert writer.budget.peak > 20 << 20, "without a bound the writer falls behind (else nothing is tested)"
    mib = 1 << 20
    print(f"resident memory growth: {bounded / mib:.1f} MiB bounded, {unbounded / mib:.1f} MiB unbounded")
    assert bounded <= buffer + margin, (
        f"resident memory grew by {bounded / mib:.1f} MiB with a {buffer / mib:.0f} MiB buffer "
        f"(unbounded: {unbounded / mib:.1f} MiB)"
    )
    assert unbounded > bounded + 20 * mib, f"the measure cannot tell: {bounded / mib:.1f} vs {unbounded / mib:.1f} MiB"


def test_drop_skips_whole_steps_and_lists_them(location, reference):
    url, steps = location("slowmem"), 32
    buffer = max(record_bytes(s) for s in range(steps)) + 1024  # one big call, or two small ones
    model = worker.build_model()

    def body() -> Any:
        with (
            torch.no_grad(),
            attnhooks.capture(model, record=worker.RECORD, store=url, buffer=buffer, when_full="drop") as cap,
        ):
            writer = cap.writer
            for step in range(steps):
                model(worker.inputs(step))
                if step % 4 == 3:  # let the writer catch up now and then, so that some steps get through
                    deadline = time.perf_counter() + TIMEOUT / 2
                    while writer.budget.used and time.perf_counter() < deadline:
                        time.sleep(0.001)
        return writer

    writer, error = in_thread(body)
    assert error is None, error
    assert writer.budget.peak <= buffer
    st = attnhooks.open_store(url)
    assert st.status == "complete"
    assert st.dropped == writer.dropped == len(st.dropped_steps) > 0, (st.dropped, writer.dropped, st.dropped_steps)
    assert sorted(st.dropped_steps) == st.dropped_steps and len(set(st.dropped_steps)) == st.dropped
    kept = [s for s in range(steps) if s not in st.dropped_steps]
    assert st.steps == kept and len(kept) > 0, "the committed steps are exactly the ones not dropped"
    assert_steps_equal(st, st.steps, reference)  # no leftovers of a half-admitted, dropped step


@pytest.mark.parametrize("when_full", ["block", "drop"])
def test_record_larger_than_buffer_is_refused(location, when_full):
    url, buffer = location("slowmem"), 1000
    model = worker.build_model()

    def body() -> Any:
        with (
            torch.no_grad(),
            attnhooks.capture(model, record=worker.RECORD, store=url, buffer=buffer, when_full=when_full),
        ):
            model(worker.inputs(0))

    _, error = in_thread(body)
    assert isinstance(error, attnhooks.StoreOptionError), repr(error)
    message = str(error)
    assert "buffer=" in message and "record=" in message, message  # names the two ways out
    assert re.search(r"\d+ B\b", message), message  # and the sizes, in bytes
    st = attnhooks.open_store(url)
    assert st.steps == [] and st.status == "complete"


_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 1000, "MB": 10**6, "GB": 10**9}


@pytest.mark.parametrize(("length", "buffer"), [(3, 500), (256, "1MiB")], ids=["bytes", "MiB"])
def test_oversize_message_shows_which_is_bigger(location, length, buffer):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, length, 16)
    need = 4 * (2 * 4 * length * 4 + 4 * length * length + 4 * length)  # q, k, attn, lse of one call

    def body() -> Any:
        with torch.no_grad(), attnhooks.capture(layer, record=worker.RECORD, store=location("slowmem"), buffer=buffer):
            layer(x)

    _, error = in_thread(body)
    assert isinstance(error, attnhooks.StoreOptionError), repr(error)
    shown = re.findall(r"(\d+(?:\.\d+)?)\s*(GiB|MiB|KiB|GB|MB|KB|bytes|B)\b", str(error))
    sizes = [float(value) * _UNITS[unit] for value, unit in shown]
    assert len(sizes) >= 2 and max(sizes) > min(sizes), f"sizes shown as equal: {error}"
    assert max(sizes) >= 0.95 * need, f"the call needs {need} B: {error}"


# -- write errors ---------------------------------------------------------------------------------
def _failing_capture(url: str, steps: int, buffer: int = 16 * 1024) -> Callable[[], Any]:
    model = worker.build_model()

    def body() -> Any:
        done = 0
        try:
            with torch.no_grad(), attnhooks.capture(model, record=worker.RECORD, store=url, buffer=buffer):
                for step in range(steps):
                    model(worker.inputs(step))
                    done += 1
        except attnhooks.AttnHooksError as err:
            err.done = done  # type: ignore[attr-defined]
            raise
        return done

    return body


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), attnhooks.StoreFullError),
        (lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), attnhooks.StoreFullError),
        (lambda: RuntimeError("backend exploded"), attnhooks.StoreWriteError),
        (lambda: OSError(errno.EIO, os.strerror(errno.EIO)), attnhooks.StoreWriteError),
    ],
    ids=["ENOSPC", "EDQUOT", "RuntimeError", "EIO"],
)
def test_backend_failure_is_typed_and_keeps_committed_steps(location, reference, monkeypatch, error, expected):
    url, steps = location("failmem"), 30
    monkeypatch.setattr(Failing, "after", 60)  # a few steps get through
    monkeypatch.setattr(Failing, "error", staticmethod(error))
    _, err = in_thread(_failing_capture(url, steps))
    assert type(err) is expected, repr(err)
    assert isinstance(err, attnhooks.StoreWriteError) and isinstance(err, OSError)
    cause = err.__cause__
    assert type(cause) is type(error()) and str(cause) == str(error()), f"cause not chained: {cause!r}"
    assert str(cause) in str(err) and "committed" in str(err), str(err)  # what failed, and what is safe
    if expected is attnhooks.StoreWriteError:
        assert type(cause).__name__ in str(err), str(err)
    assert err.done < steps, "the error reached the caller while it was still capturing"  # type: ignore[attr-defined]
    st = attnhooks.open_store(url)
    n = st.committed
    assert 0 < n < steps and st.steps == list(range(n)) and st.status == "writing"
    assert_steps_equal(st, st.steps, reference)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("how", ["read-only directory", "file as parent", "/proc"])
def test_unwritable_location_raises_store_write_error(tmp_path, suffix, how):
    pytest.importorskip("zarr" if suffix == ".zarr" else "h5py")
    if how == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions ('file as parent' and '/proc' cover this as root)")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    elif how == "file as parent":
        parent = tmp_path / "a-file"
        parent.write_text("not a directory")
    else:
        parent = Path("/proc")
    store = parent / f"attnhooks-test-{os.getpid()}-{next(_ids)}{suffix}"
    model = worker.build_model()

    def body() -> None:
        with torch.no_grad(), attnhooks.capture(model, record=worker.RECORD, store=store):
            model(worker.inputs(0))

    try:
        _, err = in_thread(body)
    finally:
        if how == "read-only directory":
            parent.chmod(0o755)
    assert isinstance(err, attnhooks.StoreWriteError) and not isinstance(err, attnhooks.StoreFullError), repr(err)
    assert str(store) in str(err), str(err)
    assert isinstance(err.__cause__, OSError), repr(err.__cause__)
    assert not store.exists()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, mounted if this process may (root in a VM); skipped otherwise."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=20).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20)


@pytest.mark.parametrize(
    "suffix",
    [
        ".zarr",
        ".h5",
    ],
)
def test_full_tmpfs_raises_store_full_error(small_tmpfs, worker_reference, suffix):
    """A real full disk, in a separate process (a crash there must not take pytest down)."""
    pytest.importorskip("zarr" if suffix == ".zarr" else "h5py")
    store = small_tmpfs / f"run{suffix}"
    done = subprocess.run(
        [sys.executable, worker.__file__, str(store), "--steps", str(STEPS)],
        capture_output=True,
        timeout=TIMEOUT * 2,
    )
    lines = done.stdout.decode(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error")]
    tail = "\n".join(lines[-3:]) + done.stderr.decode(errors="replace")[-2000:]
    assert errors, f"the capture did not fail on a full disk (rc {done.returncode}): {tail}"
    assert errors[0].startswith(f"error StoreFullError OSError {errno.ENOSPC}:"), errors[0]
    assert done.returncode == 3 and lines[-1] == "collected", f"the worker crashed (rc {done.returncode}): {tail}"
    with attnhooks.open_store(store) as st:
        n = st.committed
        assert 0 < n < STEPS and st.steps == list(range(n)) and st.status == "writing"
        assert_steps_equal(st, st.steps, worker_reference)


class _Outer(TorchFunctionMode):
    """A torch function mode of the caller's own, active around the capture."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_writer_error_between_steps_leaves_callers_modes_alone(location, monkeypatch):
    """The writer fails at a commit; the error surfaces as the next step begins, typed, and the
    caller's own torch function mode is still active afterwards."""
    url = location("failmem")
    monkeypatch.setattr(Failing, "after", 4)  # step 0: its attn written, then its commit (the stacks) fails
    monkeypatch.setattr(Failing, "error", staticmethod(lambda: RuntimeError("commit failed")))
    model = worker.build_model()

    def body() -> Any:
        with warnings.catch_warnings(record=True) as caught, _Outer() as outer:
            warnings.simplefilter("always")
            try:
                with torch.no_grad(), attnhooks.capture(model, record=worker.RECORD, store=url):
                    model(worker.inputs(0))
                    deadline = time.perf_counter() + TIMEOUT / 2
                    while any(t.name == "attnhooks-writer" for t in threading.enumerate()):
                        assert time.perf_counter() < deadline, "the writer did not fail"
                        time.sleep(0.001)
                    model(worker.inputs(1))
            except attnhooks.StoreWriteError as err:
                error: BaseException | None = err
            else:
                error = None
            stack = list(torch.overrides._get_current_function_mode_stack())
            assert stack == [outer], f"the caller's mode stack is now {stack}"
        return error, [str(w.message) for w in caught]

    result, failure = in_thread(body)
    assert failure is None, f"{failure!r} (after {failure.__context__!r})"
    error, caught = result
    assert isinstance(error, attnhooks.StoreWriteError) and isinstance(error.__cause__, RuntimeError)
    assert not [w for w in caught if "mode stack" in w], caught
