"""A capture that streams a small deterministic model into a store: the process the crash tests kill.

Run directly, it captures ``--steps`` steps into the store named on the command line::

    python store_worker.py run.zarr [--steps 200] [--hold enter|array|end|closed]

and prints one line per step, ``step <done> <committed>``: ``done`` forwards have returned and
``committed`` steps are durable (the writer set the root attribute ``committed`` *and* flushed the
store afterwards). A parent that kills this process may therefore expect at least ``committed``
steps in the store and at most ``done + 1``.

When the capture fails (a full disk, say), it prints ``error <error type> <cause type> <errno>:
<message>``, collects garbage, prints ``collected`` and exits with status 3.

``--hold`` makes the worker wait forever at one point, so that a kill lands there for sure:

* ``enter``: the store is created, no step has run (prints ``enter`` first, as without a hold);
* ``array``: in the first step, right after the writer created its first array (prints ``array``);
* ``end``: every step is durably committed, the capture is still open (prints ``end``);
* ``closed``: the capture is closed and the store complete (prints ``done``).

With ``--serve`` it imports torch, attnhooks, zarr and h5py once, then reads one request per line
from stdin (``<store> <steps> <hold or ->``) and runs each in a forked child, so that a kill costs
a fork rather than a fresh interpreter. The child's first line is ``pid <pid>``; once the child is
gone the server prints ``exit <pid> <code>`` (``-9`` after SIGKILL).

The model and the inputs are importable (:func:`build_model`, :func:`inputs`) so that a parent can
compute the same steps in memory and compare them bit for bit; both sides use one torch thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.nn as nn

RECORD = ("attn", "q", "k", "lse")
MODULES = ["0.self_attn", "1.self_attn"]
BUFFER = "32KiB"  # a few steps' worth: the writer stays close behind the forwards
D_MODEL, HEADS, BATCH = 16, 4, 2
HOLDS = ("enter", "array", "end", "closed")
GROWING = os.environ.get("ATTNHOOKS_KILL_GROWING", "0") == "1"  # see seq_len
if GROWING:
    BUFFER = "256KiB"  # a call of 43 rows records ~70 KiB


def build_model() -> nn.Module:
    """Two tiny encoder layers (their attention modules are :data:`MODULES`), fixed weights."""
    torch.manual_seed(1234)
    layers = [
        nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in MODULES
    ]
    return nn.Sequential(*layers).eval()


def seq_len(step: int) -> int:
    """Sequence lengths vary across steps (3..11), so padding and true lengths both matter. With
    ``ATTNHOOKS_KILL_GROWING=1`` in the environment they grow by one a step for the first 40 steps (3..43):
    every commit then changes the members' shapes and rewrites the stacks' description, so kills land in
    that rewrite (to loop the kill test on; the suite keeps the lengths above)."""
    if GROWING:
        return 3 + min(step, 40)
    return 3 + (step * 7) % 9


def inputs(step: int) -> torch.Tensor:
    """The input of ``step``: ``[BATCH, seq_len(step), D_MODEL]``, seeded by the step number."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(BATCH, seq_len(step), D_MODEL, generator=g)


def _say(text: str) -> None:
    os.write(1, (text + "\n").encode())  # one write per line: lines of forked children never interleave


def _hold() -> None:
    while True:
        time.sleep(3600)


def _watch(backend: Any, hold: str | None) -> list[int]:
    """Wrap the backend's ``set_attrs`` / ``flush`` (and ``create_array`` for a hold there): return a
    cell holding the durable commit count."""
    pending, durable = [0], [0]
    set_attrs, flush, create_array = backend.set_attrs, backend.flush, backend.create_array

    def create_array_(path: str, *args: Any) -> None:
        create_array(path, *args)
        if hold == "array":
            _say("array")
            _hold()

    def set_attrs_(path: str, values: dict[str, Any]) -> None:
        set_attrs(path, values)
        if path == "" and "committed" in values:
            pending[0] = int(values["committed"])

    def flush_() -> None:
        flush()
        durable[0] = pending[0]

    backend.set_attrs, backend.flush, backend.create_array = set_attrs_, flush_, create_array_
    return durable


def run(store: str, steps: int, hold: str | None = None) -> None:
    """Capture ``steps`` steps of :func:`build_model` into ``store`` (which must not exist)."""
    import attnhooks
    from attnhooks.backends import backend_for
    from attnhooks.write.writer import StoreOptions, root_attrs

    torch.set_num_threads(1)
    model = build_model()
    cls = backend_for(store)  # open it as capture(store=path) does (created with its root attrs), to watch it
    backend = cls.open(store, "w-", root_attrs(cls, StoreOptions(), {"model": "worker"}))
    durable = _watch(backend, hold)
    with torch.no_grad(), attnhooks.capture(model, record=RECORD, store=backend, buffer=BUFFER):
        _say("enter")
        if hold == "enter":
            _hold()
        for step in range(steps):
            model(inputs(step))
            _say(f"step {step + 1} {durable[0]}")
        if hold == "end":
            while durable[0] < steps:
                time.sleep(0.002)
            _say(f"end {durable[0]}")
            _hold()
    _say(f"done {durable[0]}")
    if hold == "closed":
        _hold()


def _die_with_parent() -> None:
    """Linux: be killed when the parent process dies (no worker outlives an interrupted test run)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve() -> None:
    """Fork one child per request read from stdin (see the module docstring)."""
    import threading

    _die_with_parent()

    # imported once here, inherited by every child
    import attnhooks.backends.hdf5
    import attnhooks.backends.zarrstore  # noqa: F401

    torch.set_num_threads(1)
    build_model()
    if threading.active_count() != 1:  # forking a process with threads could deadlock the child
        _say(f"error threads before fork: {threading.enumerate()}")
        sys.exit(1)
    _say("ready")
    for line in sys.stdin:
        store, steps, hold = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent()
                _say(f"pid {os.getpid()}")
                run(store, int(steps), None if hold == "-" else hold)
            except BaseException as err:
                _say(f"error {type(err).__name__}: {err}")
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("store", nargs="?", help="a new .zarr / .h5 path (not with --serve)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hold", choices=HOLDS)
    parser.add_argument("--serve", action="store_true", help="fork a child per stdin line")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
    elif args.store:
        import gc

        import attnhooks

        try:
            run(args.store, args.steps, args.hold)
        except attnhooks.AttnHooksError as err:  # e.g. a full disk: say what reached the caller
            cause = err.__cause__
            _say(f"error {type(err).__name__} {type(cause).__name__} {getattr(cause, 'errno', None)}: {err}")
            gc.collect()  # the failed store's objects go now: a crash here is a bug too
            _say("collected")
            sys.exit(3)
    else:
        parser.error("give a store path or --serve")


if __name__ == "__main__":
    main()
