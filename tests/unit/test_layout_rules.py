"""The package's shape, kept: module and class sizes, the light imports, the moved paths.

The layer contracts themselves are checked by ``lint-imports`` (``make lint``); see
docs/architecture.md."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "attnhooks"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {
        str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_is_longer_than_a_reader_can_hold():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import attnhooks", ("torch", "zarr", "h5py", "matplotlib", "transformers")),
        ("import attnhooks.read", ("torch", "zarr", "h5py", "matplotlib", "transformers")),
        ("import attnhooks.analysis", ("torch",)),
        ("import attnhooks; attnhooks.open_store", ("torch",)),
    ],
)
def test_the_read_side_imports_no_torch(statement, absent):
    code = f"{statement}; import sys; print(sorted(m for m in {absent!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{statement} imported {done.stdout.strip()}"


def test_the_public_names_load_on_first_use():
    import attnhooks

    assert callable(attnhooks.capture) and attnhooks.capture.__module__ == "attnhooks.api"
    assert attnhooks.Store.__module__ == "attnhooks.read.store"
    assert set(attnhooks.__all__) <= set(dir(attnhooks))
    with pytest.raises(AttributeError):
        attnhooks.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("attnhooks.store", "attnhooks.read.store"),
        ("attnhooks.dataset", "attnhooks.export.xarray"),
        ("attnhooks.tiles", "attnhooks.read.tiles"),
        ("attnhooks.writer", "attnhooks.write.writer"),
        ("attnhooks.masks", "attnhooks.attention.masks"),
        ("attnhooks.kernels", "attnhooks.attention.kernels"),
        ("attnhooks.native", "attnhooks.reduce.native"),
    ],
)
def test_old_paths_still_import_as_the_new_modules_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
