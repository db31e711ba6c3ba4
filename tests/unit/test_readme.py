"""Every Python block of the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


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
