"""Smoke test of benchmarks/hot_path.py at its quick sizes: every workload runs, prints its ratios and
per-call overhead, writes its JSON and leaves no store behind."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hot_path.py"


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("hot_path_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_hot_path_benchmark_runs_and_prints_ratios(tmp_path, capsys, monkeypatch):
    out = tmp_path / "hot.json"
    assert _script(monkeypatch).main(["--quick", "--dir", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| part | layers | configuration | median ms | spread ms | vs bare | per call µs |" in printed
    rows = json.loads(out.read_text())["rows"]
    configs = {(r["part"], r["config"]) for r in rows}
    assert configs == {
        *(("forward", c) for c in ("bare", "qk", "attn", "qk-held", "attn-held", "hf-eager", "eager-bare")),
        *(("generate", c) for c in ("bare", "qkl", "qkl-zarr", "qkl-hdf5", "hf-eager")),
        *(("train", c) for c in ("bare", "qkl-zarr", "qkl-hdf5")),
    }
    assert all(r["median_ms"] > 0 and r["ratio"] > 0 for r in rows)
    stored = [r for r in rows if r["config"].endswith(("zarr", "hdf5"))]
    assert stored and all(r["files_per_step"] > 0 and r["close_ms"] >= 0 for r in stored)
    assert "per-call overhead, q/k in memory (held)" in printed
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the stores were removed
