"""Crash safety of the streaming stores: a writer process SIGKILLed at random moments.

``store_worker.py`` captures a small deterministic model into a new store per run and reports,
per step, how many forwards returned and how many steps are durably committed. The parent kills
it (``random.Random(seed)`` picks when), then checks every store:

* :func:`attnhooks.open_store` opens it as it is and lists exactly the committed steps, a prefix
  ``0..n-1``, with ``durable <= n <= done + 1``;
* every committed step holds, bit for bit, what an in-memory capture of the same steps holds;
* :func:`attnhooks.repair` marks it ``recovered`` and changes nothing a reader sees;
* a repaired store takes more steps with ``mode="append"``.

The worker runs as children forked from one server process that imported torch, zarr and h5py
once, so a kill costs milliseconds instead of an interpreter start.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.schema import INFO, module_path
from tests.integration import store_worker as worker

pytest.importorskip("zarr")
pytest.importorskip("h5py")

STEPS = 200
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
SEED = {"zarr": 20240611, "hdf5": 20240612}
# other kill moments, to loop the test on (ATTNHOOKS_KILL_SEED=n pytest ... -k sigkill); the suite keeps its own
SEED_SHIFT = int(os.environ.get("ATTNHOOKS_KILL_SEED", "0"))
PROTOCOL = re.compile(r"(pid|enter|step|end|done|exit)((?: -?\d+)*)")  # the worker's lines (see store_worker)
LINE_TIMEOUT = 120.0  # a step of the worker takes milliseconds; this only turns a hang into a failure


# -- the worker server --------------------------------------------------------------------------
@dataclass
class Run:
    """What the parent saw of one worker run."""

    store: Path
    plan: str
    pid: int = 0
    entered: bool = False
    done: int = 0  # forwards returned
    durable: int = 0  # steps committed and flushed, as the worker last reported
    exit_code: int | None = None
    lines: list[str] = field(default_factory=list)


class Server:
    """``store_worker.py --serve``: one request per run, children forked from a warm process."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.current: Run | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait_ready(self) -> None:
        first = self._next(None)
        assert first == "ready", f"worker server did not start: {first!r}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _next(self, run: Run | None) -> str:
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"worker silent for {LINE_TIMEOUT}s; last lines: {run and run.lines[-5:]}") from None
        if line is None:
            raise AssertionError(f"worker server exited; last lines: {run and run.lines[-5:]}")
        if run is not None:
            run.lines.append(line)
            match = PROTOCOL.fullmatch(line)  # anything else (a warning on stderr, say) is only kept
            word, numbers = (match.group(1), [int(x) for x in match.group(2).split()]) if match else ("", [])
            if word == "pid":
                run.pid = numbers[0]
            elif word == "enter":
                run.entered = True
            elif word == "step":
                run.done, run.durable = numbers[0], max(run.durable, numbers[1])
            elif word in ("end", "done"):
                run.durable = max(run.durable, numbers[0])
            elif word == "exit" and numbers[0] == run.pid:
                run.exit_code = numbers[1]
        return line

    def until(self, run: Run, stop: Callable[[Run], bool]) -> None:
        """Read the worker's lines until ``stop(run)``; fail if the child ends first."""
        while not stop(run):
            line = self._next(run)
            if line.startswith(("exit", "error")):
                raise AssertionError(f"worker ended before it was killed: {run.lines[-5:]}")

    def start(self, store: Path, plan: str, hold: str | None = None) -> Run:
        run = self.current = Run(store, plan)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{store} {STEPS} {hold or '-'}\n".encode())
        self.proc.stdin.flush()
        self.until(run, lambda r: r.pid > 0)
        return run

    def kill(self, run: Run) -> Run:
        """SIGKILL the child, then read everything it printed before dying."""
        os.kill(run.pid, signal.SIGKILL)
        while run.exit_code is None:
            self._next(run)
        assert run.exit_code == -signal.SIGKILL, f"the worker was not killed: {run.lines[-5:]}"
        return run

    def abort(self, run: Run) -> None:
        """After a failure: make sure the child is gone, so that the next run starts clean."""
        if run.pid and run.exit_code is None:
            with contextlib.suppress(OSError, AssertionError):
                self.kill(run)

    def close(self) -> None:
        if self.current is not None and self.current.pid and self.current.exit_code is None:
            with contextlib.suppress(OSError):
                os.kill(self.current.pid, signal.SIGKILL)  # a child left holding after a failure
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Two worker servers: kills run in two lanes at once (writing a store is mostly waiting)."""
    started = [Server(tmp_path_factory.mktemp("worker")) for _ in range(2)]
    try:
        for srv in started:
            srv.wait_ready()
        yield started
    finally:
        for srv in started:
            srv.close()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The worker computes with one torch thread; so does every reference here (bitwise equality)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference() -> dict[tuple[int, str], attnhooks.Record]:
    """The worker's steps captured in memory: ``(step, module) -> Record``."""
    model = worker.build_model()
    with one_thread(), torch.no_grad(), attnhooks.capture(model, record=worker.RECORD) as cap:
        for step in range(STEPS):
            model(worker.inputs(step))
    out = {(rec.step, rec.module): rec for rec in cap.records}
    assert len(out) == len(cap.records) == STEPS * len(worker.MODULES)
    return out


# -- checks ---------------------------------------------------------------------------------------
def check_steps(st: attnhooks.Store, run: Run, ref: dict[tuple[int, str], attnhooks.Record]) -> int:
    """The store shows a prefix of the steps, no fewer than were durable, each one bit-exact."""
    n = st.committed
    assert st.steps == list(range(n)), f"{run.plan}: steps are not the prefix 0..{n - 1}: {st.steps[:12]}"
    assert run.durable <= n <= min(run.done + 1, STEPS), (
        f"{run.plan}: {n} committed steps, but the worker had {run.durable} durable and {run.done} done"
    )
    if n == 0:
        return 0
    assert st.modules == worker.MODULES
    col = {name: i for i, name in enumerate(INFO)}
    be = st.backend
    for module in worker.MODULES:
        base = module_path(module)
        calls = be.read(f"{base}/calls", (slice(0, n),))
        info = be.read(f"{base}/info", (slice(0, n), 0))
        arrays = {leaf: be.read(f"{base}/{leaf}", (slice(0, n), 0)) for leaf in ("q", "k", "attn", "lse")}
        assert calls.tolist() == [1] * n, f"{run.plan}: {module} calls per step {calls.tolist()}"
        for step in range(n):
            rec, length = ref[step, module], worker.seq_len(step)
            sizes = [int(info[step, col[c]]) for c in ("batch", "q_len", "k_len", "k_stored")]
            assert sizes == [worker.BATCH, length, length, length], f"{run.plan}: step {step} {module} {sizes}"
            for b in range(worker.BATCH):
                got = {
                    "q": arrays["q"][step, b, :, :length],
                    "k": arrays["k"][step, b, :, :length],
                    "attn": arrays["attn"][step, b, :, :length, :length],
                    "lse": arrays["lse"][step, b, :, :length],
                }
                for leaf, value in got.items():
                    want = getattr(rec, leaf)[b].numpy()
                    assert np.array_equal(value, want), f"{run.plan}: step {step} {module} sample {b} {leaf} differs"
    # the public reader, on the first and the last committed step (the last is the one a kill threatens)
    for step in sorted({0, n - 1}):
        for module in worker.MODULES:
            rec = ref[step, module]
            for b in range(worker.BATCH):
                assert np.array_equal(st.attention(module, step=step, sample=b), rec.attn[b].numpy())
                assert np.array_equal(st.q(module, step=step, sample=b), rec.q[b].numpy())
                assert np.array_equal(st.k(module, step=step, sample=b), rec.k[b].numpy())
                assert np.array_equal(st.lse(module, step=step, sample=b), rec.lse[b].numpy())
    return n


class HDF5LeftOutsideSWMR(Exception):
    """The known HDF5 failure: killed while the file was open for writing outside SWMR mode."""


def open_killed(run: Run) -> attnhooks.Store:
    try:
        return attnhooks.open_store(run.store)
    except attnhooks.NotAStoreError as err:
        if "not already open for SWMR writing" in str(err):
            raise HDF5LeftOutsideSWMR(f"{run.plan} (killed after {run.done} forwards): {err}") from err
        raise


def check_killed_store(run: Run, ref: dict[tuple[int, str], attnhooks.Record]) -> int:
    """Open as it is, then repair, then open again: the same steps, the same bits."""
    with open_killed(run) as st:  # no repair first
        n = check_steps(st, run, ref)
        status = st.status
    if status == "complete":  # only a kill after the capture closed may find it complete
        assert run.plan == "closed" and n == STEPS, f"{run.plan}: complete store with {n} steps"
    else:
        assert status == "writing", f"{run.plan}: status {status!r}"
    report = attnhooks.repair(run.store)
    assert report.status_before == status and report.committed == n
    assert report.status == ("recovered" if status == "writing" else "complete")
    with attnhooks.open_store(run.store) as st:
        assert st.status == report.status
        assert check_steps(st, run, ref) == n
    return n


@dataclass
class Plan:
    """One kill: start the worker (with ``hold``), wait until ``ready(run)``, sleep ``delay``, kill."""

    name: str
    hold: str | None
    ready: Callable[[Run], bool]
    delay: float
    cost: int = 0  # steps the worker runs before the kill (to balance the lanes)


def plans(rng: random.Random) -> list[Plan]:
    """Twelve kills, from before the first commit to the store's final close."""

    def after(target: int) -> Callable[[Run], bool]:
        return lambda r: r.done >= target

    out = [
        Plan("enter", "enter", lambda r: r.entered, rng.uniform(0, 0.02)),  # created, nothing committed
        Plan("array", "array", lambda r: "array" in r.lines, rng.uniform(0, 0.02)),  # first array written
        Plan("early-1", None, lambda r: r.entered, rng.uniform(0, 0.01)),  # within the first step(s)
        Plan("early-2", None, lambda r: r.entered, rng.uniform(0, 0.03)),
    ]
    for i in range(6):
        target = rng.randint(1, 40)
        out.append(Plan(f"mid-{i}@{target}", None, after(target), rng.uniform(0, 0.03), target))
    late = rng.randint(150, STEPS - 1)
    out.append(Plan(f"late@{late}", None, after(late), rng.uniform(0, 0.03), late))
    out.append(Plan("closed", "closed", after(STEPS), rng.uniform(0, 0.15), STEPS))  # during (or after) the close
    return out


def lanes(schedule: list[Plan], n: int) -> list[list[tuple[int, Plan]]]:
    """Spread the plans over ``n`` lanes, the costliest first, each to the least loaded lane."""
    out: list[list[tuple[int, Plan]]] = [[] for _ in range(n)]
    load = [0] * n
    for i, plan in sorted(enumerate(schedule), key=lambda ip: -ip[1].cost):
        lane = load.index(min(load))
        out[lane].append((i, plan))
        load[lane] += plan.cost + 1
    return out


def swmr_case(backend: str, *more: str) -> Any:
    """A test case (HDF5 once failed here: a writer killed out of SWMR mode left an unreadable file)."""
    return pytest.param(backend, *more)


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("zarr", marks=pytest.mark.slow), swmr_case("hdf5")])
def test_sigkill_at_random_moments_leaves_committed_prefix(backend, servers, reference, tmp_path):
    """At least ten kills per backend; every store opens as it is and shows its committed prefix."""
    rng = random.Random(SEED[backend] + SEED_SHIFT)
    schedule = plans(rng)
    outcome: dict[str, int | BaseException] = {}

    def work(server: Server, items: list[tuple[int, Plan]]) -> None:
        for i, plan in items:
            run = Run(tmp_path / f"run{i}{SUFFIX[backend]}", plan.name)
            try:
                run = server.start(run.store, plan.name, plan.hold)
                server.until(run, plan.ready)
                time.sleep(plan.delay)
                server.kill(run)
                outcome[plan.name] = check_killed_store(run, reference)
            except BaseException as err:
                outcome[plan.name] = err
                server.abort(run)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=lane) for lane in zip(servers, lanes(schedule, len(servers)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert sorted(outcome) == sorted(p.name for p in schedule)
    known = {k: v for k, v in outcome.items() if isinstance(v, HDF5LeftOutsideSWMR)}
    failed = {k: v for k, v in outcome.items() if isinstance(v, BaseException) and k not in known}
    if failed:
        err = next(iter(failed.values()))
        raise AssertionError(f"{len(failed)} of {len(schedule)} killed stores failed: {failed}") from err
    committed = {k: v for k, v in outcome.items() if not isinstance(v, BaseException)}
    print(f"{backend}: {len(schedule)} kills in {elapsed:.1f}s, committed steps {committed}, known bug {list(known)}")
    assert len(schedule) >= 10
    assert committed.get("enter", 0) == 0
    assert any(0 < n < STEPS for n in committed.values()), f"no kill landed mid-run: {committed}"
    if known:
        raise HDF5LeftOutsideSWMR(f"{len(known)} of {len(schedule)} HDF5 stores unreadable: {list(known.values())}")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_append_continues_a_killed_and_repaired_store(backend, servers, reference, tmp_path):
    store = tmp_path / f"run{SUFFIX[backend]}"
    run = servers[0].start(store, "append")
    servers[0].until(run, lambda r: r.durable >= 5)
    servers[0].kill(run)
    model = worker.build_model()
    with pytest.raises(attnhooks.StoreStateError, match="repair"):  # not before repair
        with attnhooks.capture(model, record=worker.RECORD, store=store, mode="append"):
            pass
    n = check_killed_store(run, reference)
    assert n >= 5
    with one_thread(), torch.no_grad():
        with attnhooks.capture(model, record=worker.RECORD, store=store, mode="append") as cap:
            assert cap.step == n, "step ids continue after the committed ones"
            for step in range(n, n + 4):
                model(worker.inputs(step))
    run.done, run.durable = n + 4, n + 4
    with attnhooks.open_store(store) as st:
        assert st.status == "complete"
        assert check_steps(st, run, reference) == n + 4


@pytest.mark.parametrize(
    ("backend", "hold"),
    [
        ("zarr", "enter"),
        ("hdf5", "enter"),
        swmr_case("zarr", "array"),
        swmr_case("hdf5", "array"),
    ],
)
def test_kill_before_the_first_commit(backend, hold, servers, tmp_path):
    """Killed in the store's creation, right after it, or inside the first step: the store opens
    with no step (or, at the least, repair makes it open), and repair marks it recovered."""
    store = tmp_path / f"run{SUFFIX[backend]}"
    run = servers[0].start(store, hold, hold)
    servers[0].until(run, lambda r: hold in r.lines[-1])
    servers[0].kill(run)
    assert run.durable == 0
    with open_killed(run) as st:
        assert (st.steps, st.committed, st.status) == ([], 0, "writing")
    report = attnhooks.repair(store)
    assert (report.status_before, report.status, report.committed) == ("writing", "recovered", 0)
    with attnhooks.open_store(store) as st:
        assert (st.steps, st.status) == ([], "recovered")


def test_repair_copies_an_array_hdf5_refuses_to_copy_chunk_by_chunk(servers, reference, tmp_path, monkeypatch):
    """Repair rewrites a file a killed HDF5 writer left open. HDF5's copy of a whole array can fail
    there ("len not positive after adjustment for EOA": its chunk index was flushed before the file's
    end-of-allocation mark), seen once in ~50 kill runs under load; that array is then copied chunk by
    chunk, and the repaired store shows the same committed steps, bit for bit."""
    import h5py

    store = tmp_path / "run.h5"
    run = servers[0].start(store, "eoa")
    servers[0].until(run, lambda r: r.durable >= 3)
    servers[0].kill(run)
    real_copy = h5py.Group.copy
    refused: list[str] = []

    def copy(self, source, dest, name=None, **kw):
        if isinstance(source, h5py.Dataset) and "/q" in source.name:
            refused.append(source.name)
            raise RuntimeError("Unable to synchronously copy object (len not positive after adjustment for EOA)")
        return real_copy(self, source, dest, name, **kw)

    monkeypatch.setattr(h5py.Group, "copy", copy)
    n = check_killed_store(run, reference)
    assert n >= 3 and refused, "the refused arrays were copied chunk by chunk"


@pytest.mark.parametrize("error", [KeyError("/stacks/k.0 does not open"), RuntimeError("wrong fractal heap")])
def test_repair_that_cannot_copy_a_store_with_commits_raises_a_typed_error(tmp_path, monkeypatch, error):
    """What the HDF5 rewrite refuses (a part that does not read, with steps committed) reaches the caller of
    attnhooks.repair as a StoreCorruptError that says the file was left as it was and what to do."""
    from attnhooks.backends.hdf5 import HDF5Backend

    path = tmp_path / "run.h5"
    model = worker.build_model()
    with one_thread(), torch.no_grad(), attnhooks.capture(model, record=worker.RECORD, store=path):
        model(worker.inputs(0))
    before = path.read_bytes()

    def refuse(location):
        raise error

    monkeypatch.setattr(HDF5Backend, "cleanup", classmethod(lambda cls, location: refuse(location)))
    with pytest.raises(attnhooks.StoreCorruptError, match=r"left as it was.*open_store.*new store") as raised:
        attnhooks.repair(path)
    assert raised.value.__cause__ is error and path.read_bytes() == before


@pytest.mark.parametrize("described", [True, False])
def test_a_spare_description_that_does_not_open_is_left_out_when_the_stacks_own_reads(tmp_path, described):
    """A writer killed while it made ``stacks/spare`` (the copy of the stacks' description, made at the first
    change of an older store appended to) leaves a link to nothing, with steps committed: the copy is left
    out and said so, the store's own description kept. Without a description that reads, as any such link."""
    import h5py

    from attnhooks.backends.hdf5copy import rewrite

    path = tmp_path / "killed.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["committed"] = 2
        f.create_dataset("stacks/q.0", data=np.arange(8.0))
        if described:
            f["stacks"].attrs["attnhooks_stack"] = '{"q.0": {}}'
        f["stacks/spare"] = h5py.SoftLink("/nowhere")
    if not described:
        with pytest.raises(KeyError, match="does not open"):
            rewrite(str(path))
        return
    report = rewrite(str(path))
    assert any(line.startswith("/stacks/spare: does not open") for line in report), report
    with h5py.File(path, "r") as f:
        assert sorted(f["stacks"]) == ["q.0"] and f["stacks"].attrs["attnhooks_stack"] == '{"q.0": {}}'
        assert f.attrs["committed"] == 2


def _rewritten_unless_refused(path, refused):
    """The HDF5 rewrite's report for the file at ``path``; None when ``refused``, after checking that it raised
    (a link that does not open) and left the file as it was."""
    from attnhooks.backends.hdf5copy import rewrite

    before = path.read_bytes()
    if not refused:
        return rewrite(str(path))
    with pytest.raises(KeyError, match="does not open"):
        rewrite(str(path))
    assert path.read_bytes() == before
    return None


@pytest.mark.parametrize("listed", [False, True])
def test_a_stack_that_does_not_open_is_left_out_when_no_description_lists_it(tmp_path, listed):
    """With steps committed, a link to a stack array that does not open (a writer killed while a later commit
    made a new stack) is left out when no copy of the stacks' description lists it: a commit lists and
    flushes its new stacks before it counts its step, so no committed step reads it. A listed one is damage:
    repair raises and leaves the file as it was."""
    import h5py

    path = tmp_path / "killed.h5"
    described = '{"q.0": {}, "k.0": {}}' if listed else '{"q.0": {}}'
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["committed"] = 3
        f.create_dataset("stacks/q.0", data=np.arange(8.0))
        f["stacks"].attrs["attnhooks_stack"] = described
        f.create_group("stacks/spare").attrs["attnhooks_stack"] = described
        f["stacks/k.0"] = h5py.SoftLink("/nowhere")
    report = _rewritten_unless_refused(path, refused=listed)
    if report is None:
        return
    assert any(line.startswith("/stacks/k.0: does not open") and "no description lists" in line for line in report)
    with h5py.File(path, "r") as f:
        assert sorted(f["stacks"]) == ["q.0", "spare"] and f.attrs["committed"] == 3
        np.testing.assert_array_equal(f["stacks/q.0"][...], np.arange(8.0))


@pytest.mark.parametrize("module", ["b", "a"])
def test_a_module_group_that_does_not_open_is_left_out_when_no_description_lists_it(tmp_path, module):
    """The same for a module's group (a module first seen in a step that was not committed): left out when
    no description lists its ``calls`` table; a listed module's group that does not open raises."""
    import h5py

    path = tmp_path / "killed.h5"
    described = '{"calls.0": {"members": [["modules/a/calls", [3]], null]}}'
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["committed"] = 3
        f.create_dataset("stacks/calls.0", data=np.arange(8))
        f["stacks"].attrs["attnhooks_stack"] = described
        f.create_group("modules/c").attrs["name"] = "c"
        f[f"modules/{module}"] = h5py.SoftLink("/nowhere")
    report = _rewritten_unless_refused(path, refused=module == "a")
    if report is None:
        return
    assert any(line.startswith("/modules/b: does not open") and "no description lists" in line for line in report)
    with h5py.File(path, "r") as f:
        assert sorted(f["modules"]) == ["c"] and f["stacks"].attrs["attnhooks_stack"] == described


@pytest.mark.parametrize("committed", [0, 1])
def test_a_link_whose_object_does_not_open_is_left_out_only_when_nothing_was_committed(tmp_path, committed):
    """A writer killed in its first commit, while it made the stacks' arrays, left a link to an array whose
    object header lay past the file's end (seen in the kill test looped on other seeds: h5py's items()
    yields None for it, and the copy raised TypeError). As a torn group: the root alone when nothing was
    committed; with commits the repair raises and leaves the file as it was."""
    import h5py

    from attnhooks.backends.hdf5copy import rewrite

    path = tmp_path / "killed.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["committed"] = committed
        f.create_dataset("stacks/q.0", data=np.arange(8.0))
        f["stacks/k.0"] = h5py.SoftLink("/nowhere")  # a link to no object
    before = path.read_bytes()
    if committed:
        with pytest.raises(KeyError, match="does not open"):
            rewrite(str(path))
        assert path.read_bytes() == before and not (tmp_path / "killed.h5.repair-tmp").exists()
        return
    report = rewrite(str(path))
    assert any("nothing was committed" in line and "does not open" in line for line in report), report
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {"committed": 0} and list(f) == []


@pytest.mark.parametrize("committed", [0, 1])
def test_a_group_torn_in_a_killed_first_step_is_left_out_only_when_nothing_was_committed(tmp_path, committed):
    """A writer killed while its first step made the module groups (HDF5 promises nothing of groups made
    under SWMR) left one whose attributes do not read ("wrong fractal heap header signature", seen in the
    kill test): the repair's copy gives back the root alone when nothing was committed, and refuses
    (raises, the file left as it was) when something was."""
    import h5py

    from attnhooks.backends.hdf5copy import rewrite

    path = tmp_path / "killed.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["committed"] = committed
        group = f.create_group("modules/m")
        for i in range(20):  # more than HDF5 keeps in the object header: a fractal heap holds them
            group.attrs[f"a{i}"] = f"value {i}"
        group.create_dataset("q", data=np.arange(8.0))
    raw = bytearray(path.read_bytes())
    heap = raw.find(b"FRHP")
    assert heap >= 0 and raw.find(b"FRHP", heap + 1) < 0, "one fractal heap: the group's attributes"
    raw[heap : heap + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f, pytest.raises(RuntimeError, match="fractal heap"):
        dict(f["modules/m"].attrs)
    if committed:
        with pytest.raises(RuntimeError, match="fractal heap"):
            rewrite(str(path))
        assert path.read_bytes() == bytes(raw) and not (tmp_path / "killed.h5.repair-tmp").exists()
        return
    report = rewrite(str(path))
    assert any("nothing was committed" in line for line in report), report
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {"committed": 0} and list(f) == []
