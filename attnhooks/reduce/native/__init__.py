"""The summary's one-pass row kernel (``summary.c``), built with the machine's C compiler at first use.

Every row reduction of a ``"summary"`` capture (entropy, top-k, sinks, band, column sums, overview
maxima) reads a block of log-probabilities once in C, instead of a dozen torch passes over it:
3-4x less CPU per block. The score product stays a torch ``bmm``.

Build: ``$CC`` (else the compiler Python was built with, else ``cc``), ``-O3`` for the machine's
own vector instructions, and OpenMP when torch runs on GNU OpenMP (the kernel then shares torch's
thread pool: no second pool, no oversubscription). ~0.5 s, once: the library is kept in
``$ATTNHOOKS_CACHE`` (default ``$XDG_CACHE_HOME/attnhooks`` or ``~/.cache/attnhooks``) under a name
that hashes the source, the compiler, the flags and the CPU, so a home directory shared by
different machines holds one build per CPU.

Without a compiler, or with ``ATTNHOOKS_NATIVE=0``, summaries are computed by torch (same values
within float32 rounding, slower); :func:`status` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Block", "status", "summary_kernel"]

log = logging.getLogger("attnhooks")

_SOURCE = Path(__file__).with_name("summary.c")
_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math", "-fPIC")
_PORTABLE = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC")  # when the compiler refuses the others
_lock = threading.Lock()
_state: dict[str, object] = {}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class Block(ctypes.Structure):
    """``struct attnhooks_block`` of ``summary.c`` (pointers as addresses; 0 = not wanted)."""

    _fields_ = [
        ("x", _ptr),
        ("heads", _i64),
        ("rows", _i64),
        ("n", _i64),
        ("own", _i64),
        ("causal", _i64),
        ("window", _i64),
        ("floor", ctypes.c_float),
        ("entropy", _ptr),
        ("sink", _ptr),
        ("sinks", _i64),
        ("band", _ptr),
        ("band_width", _i64),
        ("band_own", _i64),
        ("topw", _ptr),
        ("topi", _ptr),
        ("topk", _i64),
        ("tb", _i64),
        ("index_base", _i64),
        ("colsum", _ptr),
        ("pmax", _ptr),
        ("rb", _i64),
        ("parts", _i64),
        ("cell", _i64),
        ("cb", _i64),
        ("nkb", _i64),
        ("threads", _i64),
    ]


def summary_kernel() -> Callable[[Any], int] | None:
    """``int attnhooks_summary_block(const struct attnhooks_block*)``, built and loaded on first
    call; None when it cannot be (see :func:`status`)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"], _state["status"] = _load()
                log.info("attnhooks: summary kernel: %s", _state["status"])
    return _state["kernel"]  # type: ignore[return-value]


def status() -> str:
    """Which path ``"summary"`` captures take on the CPU, and why (builds the kernel if needed)."""
    summary_kernel()
    return str(_state["status"])


def _load() -> tuple[object, str]:
    setting = os.environ.get("ATTNHOOKS_NATIVE", "1")
    if setting.strip().lower() in ("0", "false", "no", "off"):
        return None, f"torch (ATTNHOOKS_NATIVE={setting})"
    compiler = _compiler()
    if compiler is None:
        return None, "torch (no C compiler found: set CC, or install gcc or clang)"
    # OpenMP only next to torch's own libgomp; each later try gives up a little speed to build at all
    tries: list[tuple[str, ...]] = [(*_FLAGS, "-fopenmp")] if _torch_uses_gnu_openmp() else []
    tries += [(*_FLAGS, "-fopenmp-simd"), (*_PORTABLE, "-fopenmp-simd")]
    errors = []
    for flags in tries:
        openmp = "-fopenmp" in flags
        try:
            path = _build(compiler, flags)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
            continue
        kernel = lib.attnhooks_summary_block
        kernel.argtypes = [ctypes.POINTER(Block)]
        kernel.restype = ctypes.c_int
        threads = "torch's OpenMP threads" if openmp else "one thread"
        return kernel, f"native ({path.name}, {threads})"
    return None, f"torch (the C kernel did not build: {'; '.join(errors)})"


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            words = shlex.split(candidate)
            if words and shutil.which(words[0]):
                return words
    return None


def _torch_uses_gnu_openmp() -> bool:
    """True when torch's own libgomp is loaded (Linux wheels): a library built with ``-fopenmp``
    then binds to that one (same soname) and uses torch's thread pool."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def _build(compiler: list[str], flags: tuple[str, ...]) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join(x.encode() for x in (version, " ".join(compiler), " ".join(flags), _cpu())))
    key.update(source)
    name = f"summary-{key.hexdigest()[:16]}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    for folder in _cache_dirs():
        path = folder / name
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _trusted(folder):
                continue
            if path.exists():
                if _trusted(path):
                    return path
                continue
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=path.suffix, dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run(
                [*compiler, *flags, "-shared", "-o", tmp, str(_SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            os.replace(tmp, path)  # atomic: another process building the same name loses nothing
        except subprocess.CalledProcessError as err:
            raise subprocess.SubprocessError(f"{' '.join(err.cmd)}: {err.stderr.strip()}") from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    raise OSError(
        "no writable cache folder that only this user can write for the summary kernel "
        f"(tried {', '.join(map(str, _cache_dirs()))}; set ATTNHOOKS_CACHE)"
    )


def _cache_dirs() -> list[Path]:
    if os.environ.get("ATTNHOOKS_CACHE"):
        return [Path(os.environ["ATTNHOOKS_CACHE"])]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = os.getuid() if hasattr(os, "getuid") else 0
    return [Path(base) / "attnhooks", Path(tempfile.gettempdir()) / f"attnhooks-{user}"]


def _trusted(path: Path) -> bool:
    """Only a library this user built is loaded: the file and its folder are ours and nobody
    else may write them (a shared temporary folder could hold someone else's planted file)."""
    if not hasattr(os, "getuid"):
        return True
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
