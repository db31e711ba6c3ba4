"""What checksums cost (issue 18): writing and reading the same stores with and without them.

Every chunk of a store now carries a checksum (Zarr v3 ``crc32c``, HDF5 ``fletcher32``) and every
chunk written is kept, also one holding only zeros (the part of a causal ``attn`` above the
diagonal), so that a missing chunk is found missing. This benchmark runs the same work with that
("on") and without it ("off": ``Codec.checksum=False``, the stores of attnhooks 0.1), each arm in a
fresh process, arms interleaved, ``--repeats`` times, and prints medians and the on/off ratio:

* ``write forward``: a 4-layer Llama-style model (hidden 256, 4 heads), 3 forwards at 512 tokens,
  record attn, q, k, the whole ``with capture(...)`` block (forwards, writer, close), the
  backend's default codecs (zstd level 1 for attn; q and k uncompressed);
* ``write long call``: one causal call of ``--tokens`` tokens (4 heads over 2 KV heads, d=64)
  declared through ``attnhooks.emit``, record attn, q, k, lse (the store ``read_tiles.py`` reads);
* the reads of ``benchmarks/read_tiles.py`` on that store: 256 x 256 tiles (diagonal, far below,
  top-left, above the diagonal), a 256-row window and the whole head, rebuilt from q, k, lse
  ("rebuilt") and read from the stored attn ("stored"), each on a freshly opened store;
* the store's size on disk.

Run: ``python benchmarks/checksum_cost.py [--repeats 3] [--tokens 2048] [--backends zarr,hdf5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from read_tiles import disk_bytes, emitter, reads, timed

ARMS = ("off", "on")


def _no_checksums() -> None:
    """Make every codec of this process write without checksums (the 0.1 stores)."""
    import dataclasses

    from attnhooks.backends import base, hdf5, zarrstore
    from attnhooks.write import layout
    from attnhooks.write import open as opening

    plain = dataclasses.replace
    original = base.Codec

    def codec(*args: Any, **kwargs: Any) -> Any:
        return plain(original(*args, **kwargs), checksum=False)

    for cls in (zarrstore.ZarrBackend, hdf5.HDF5Backend):
        cls.default_codec = plain(cls.default_codec, checksum=False)
    layout.Codec = codec  # type: ignore[assignment,misc]
    opening.Codec = codec  # type: ignore[assignment,misc]
    original_replace = layout.dataclasses.replace
    layout.dataclasses.replace = lambda obj, **kw: original_replace(obj, **{**kw, "checksum": False})  # type: ignore[assignment]


def child(arm: str, backend: str, tokens: int, folder: str) -> dict[str, Any]:
    import torch
    from common import llama

    import attnhooks

    if arm == "off":
        _no_checksums()
    torch.set_num_threads(1)
    suffix = ".zarr" if backend == "zarr" else ".h5"
    out: dict[str, Any] = {}

    model = llama(256, 4, 4, 512, 1000, 1024)
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    path = os.path.join(folder, f"forward-{arm}{suffix}")
    start = time.perf_counter()
    with torch.inference_mode(), attnhooks.capture(model, store=path, record=("attn", "q", "k")):
        for _ in range(3):
            model(ids, use_cache=False)
    out["write forward"] = time.perf_counter() - start
    out["size forward"] = disk_bytes(path)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, tokens, 64, generator=g), torch.randn(1, 2, tokens, 64, generator=g)
    path = os.path.join(folder, f"call-{arm}{suffix}")
    emitting = emitter()
    start = time.perf_counter()
    buffer = 2 * 4 * tokens**2 * 4 + (64 << 20)
    with (
        torch.inference_mode(),
        attnhooks.capture(emitting, store=path, record=("attn", "q", "k", "lse"), buffer=buffer),
    ):
        emitting(q, k)
    out["write long call"] = time.perf_counter() - start
    out["size long call"] = disk_bytes(path)
    for r in reads(tokens, 256):
        for method, label in (("reconstructed", "rebuilt"), ("stored", "stored")):
            out[f"read {r.name} {label}"] = statistics.median(timed(path, 1, r, method) for _ in range(3))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--backends", default="zarr,hdf5")
    p.add_argument("--child", nargs=3, metavar=("ARM", "BACKEND", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.tokens, args.child[2])))
        return 0
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for backend in args.backends.split(","):
            for arm in ARMS if rep % 2 == 0 else ARMS[::-1]:  # interleaved, the order alternating
                folder = tempfile.mkdtemp(prefix="attnhooks-checksum-")
                try:
                    cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--child", arm, backend, folder]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                runs.setdefault((backend, arm), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  repeat {rep + 1}/{args.repeats} {backend} checksums {arm}", file=sys.stderr)
    print(f"checksum cost: medians of {args.repeats} runs per arm, {args.tokens}-token call, 1 torch thread")
    print("| backend | measure | checksums off | checksums on | on / off |")
    print("|---|---|---:|---:|---:|")
    for backend in args.backends.split(","):
        for key in runs[(backend, "off")][0]:
            off = statistics.median(r[key] for r in runs[(backend, "off")])
            on = statistics.median(r[key] for r in runs[(backend, "on")])
            unit = (lambda v: f"{v / 2**20:.1f} MiB") if key.startswith("size") else (lambda v: f"{v * 1e3:.1f} ms")
            print(f"| {backend} | {key} | {unit(off)} | {unit(on)} | {on / off:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
