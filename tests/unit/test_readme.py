"""Every code block of the README runs as written: the Python blocks, the ``attnhooks`` command lines
and ``python examples/...`` lines of the shell blocks. ``make`` and ``pip`` lines are what CI itself
runs (.ci/run); the benchmark lines are run, in their quick form, by tests/unit/test_bench_*.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
COMMANDS = [
    line.strip()
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", TEXT, flags=re.S)
    for line in block.splitlines()
    if line.strip().startswith("attnhooks ")
]

EXAMPLES = re.findall(r"^python (examples/\S+\.py)", TEXT, flags=re.M)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    # a comment after a print() call states that call's output
    expected = [m.group(1) for line in BLOCKS[index].splitlines() if (m := re.match(r"print\(.*\)\s+#\s+(.+)$", line))]
    printed = out.splitlines()
    assert len(printed) >= len(expected)
    for want in expected:
        assert want in printed, (want, printed)


def test_readme_command_lines_run_in_order(tmp_path):
    script = Path(sys.executable).with_name("attnhooks")
    for line in COMMANDS:
        argv = shlex.split(line, comments=True)
        command = [str(script), *argv[1:]] if script.exists() else [sys.executable, "-m", "attnhooks.cli", *argv[1:]]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-2000:])


@pytest.mark.parametrize("script", EXAMPLES)
def test_readme_example_scripts_run(script):
    done = subprocess.run([sys.executable, script], cwd=README.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
