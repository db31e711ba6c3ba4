#!/usr/bin/env bash
# Rewrite requirements/ci.txt, the exact versions CI installs (see its header).
#
#   scripts/lock.sh          resolve pyproject.toml's ranges afresh in .venv-lock (the newest releases
#                            they allow today), then freeze that venv  (`make lock`)
#   scripts/lock.sh VENV     freeze an existing venv instead (one made by `make`, say)
#
# Review the diff, run `make test` on the new lock, commit the file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=${1:-}
if [ -z "$venv" ]; then
    venv=.venv-lock
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0  # first: the CPU build (see constraints.txt)
    "$venv/bin/python" -m pip install -q -e ".[dev]" -c constraints.txt
fi
py="$venv/bin/python"
out=requirements/ci.txt
mkdir -p requirements
{
    cat <<HEADER
# The exact versions CI installs: every package the test suite and the demo need (extra "dev").
# Produced by scripts/lock.sh: \`pip freeze --exclude-editable\` of a venv made with
#   pip install torch==2.13.0 && pip install -e ".[dev]" -c constraints.txt
# (attnhooks itself is left out). Frozen on $(date -u +%Y-%m-%d), $("$py" -c 'import platform; print("Python", platform.python_version(), platform.machine())').
# The Makefile installs it on a fresh venv as
#   pip install torch==2.13.0                              # the CPU build first
#   pip install -r requirements/ci.txt -c constraints.txt
#   pip install --no-deps -e .
# Refresh (after changing pyproject.toml's dependencies, or to move to newer releases):
#   make lock      # = scripts/lock.sh: resolves pyproject.toml's ranges afresh in .venv-lock
# then \`rm -rf .venv && make test\` and commit this file. \`make test-compat\` covers the
# oldest and newest versions of the declared ranges.
HEADER
    "$py" -m pip freeze --exclude-editable
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
