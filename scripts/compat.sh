#!/usr/bin/env bash
# `make test-compat`: the integration tests that touch transformers / diffusers / peft, run against the
# oldest and the newest versions of the ranges pyproject.toml declares, each in its own venv.
#
#   oldest  transformers 4.57.6, diffusers 0.30.0, peft 0.13.0, accelerate 1.3.0 (the declared minimums;
#           accelerate 1.3: transformers' Trainer calls unwrap_model(keep_torch_compile=), added in 1.3)
#   first5  transformers 5.0.0 (the oldest 5.x), the newest diffusers, peft and accelerate
#   newest  the newest transformers 5.x, diffusers, peft and accelerate that pip resolves
#
# Each venv is .venv-compat/<env>, made with torch==2.13.0 first (the CPU build), then
# `pip install -e ".[dev]" -c constraints.txt -c .venv-compat/<env>.pins.txt`. A venv is reused while
# its stamp is newer than this script, pyproject.toml and constraints.txt; COMPAT_FRESH=1 rebuilds
# them all (so that `newest` picks up releases made since). COMPAT_ENVS="oldest" runs a subset;
# extra arguments go to pytest. Logs: .venv-compat/<env>.log (install), <env>.pytest.log, <env>.xml.
# Prints a summary table; exits non-zero when any environment failed to install or to pass.
set -uo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
script="$here/scripts/compat.sh"
PYTHON=${PYTHON:-python3}
ROOT=.venv-compat
ENVS=${COMPAT_ENVS:-oldest first5 newest}
mkdir -p "$ROOT"

pins() {  # the extra constraints of one environment, one requirement a line
    case "$1" in
        oldest) printf '%s\n' transformers==4.57.6 diffusers==0.30.0 peft==0.13.0 accelerate==1.3.0 ;;
        first5) printf '%s\n' transformers==5.0.0 ;;
        newest) printf '%s\n' "transformers>=5,<6" ;;  # the rest: the newest that pip resolves
        *) echo "unknown compat environment: $1" >&2; return 1 ;;
    esac
}

# the tests: every file that exists of this list (test_generation_*.py: whatever is there now)
tests=()
for f in tests/integration/test_generation.py tests/integration/test_generation_*.py \
    tests/integration/test_hf_models.py tests/integration/test_store_capture.py \
    tests/integration/test_diffusers_peft_ddp.py tests/integration/test_store_backends.py \
    tests/unit/capturing/test_capture_api.py tests/unit/capturing/test_recorder.py \
    tests/integration/test_reconstruct.py tests/unit/capturing/test_plan.py \
    tests/integration/test_callbacks_hf.py tests/integration/test_decode_rows.py; do
    [ -f "$f" ] && tests+=("$f")
done
echo "compat tests: ${tests[*]}"

install() {  # install() ENV: (re)make .venv-compat/ENV unless its stamp is fresh
    local name=$1 venv="$ROOT/$1" log="$ROOT/$1.log"
    local py="$venv/bin/python" stamp="$venv/.compat-installed" pinfile="$ROOT/$1.pins.txt"
    if [ -z "${COMPAT_FRESH:-}" ] && [ -f "$stamp" ] && [ "$stamp" -nt "$script" ] \
        && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
        echo "[$name] reusing $venv"
        return 0
    fi
    echo "[$name] installing $venv (log: $log)"
    rm -rf "$venv"
    pins "$name" > "$pinfile" || return 1
    {
        "$PYTHON" -m venv "$venv" \
            && "$py" -m pip install -q --upgrade pip \
            && "$py" -m pip install -q torch==2.13.0 \
            && "$py" -m pip install -q -e ".[dev]" -c constraints.txt -c "$pinfile" \
            && "$py" -m pip check
    } > "$log" 2>&1 || { echo "[$name] install failed: see $log" >&2; tail -5 "$log" >&2; return 1; }
    touch "$stamp"
}

# versions and counts: one line per environment, tab-separated, read back for the table
rows="$ROOT/summary.tsv"
: > "$rows"
failed=0
for name in $ENVS; do
    py="$ROOT/$name/bin/python"
    xml="$ROOT/$name.xml"
    rm -f "$xml"
    if ! install "$name"; then
        printf '%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\tinstall failed\n' "$name" >> "$rows"
        failed=1
        continue
    fi
    versions=$("$py" - <<'EOF'
import importlib.metadata as m
print("\t".join(m.version(p) for p in ("transformers", "diffusers", "peft", "accelerate", "torch")))
EOF
)
    echo "[$name] pytest (log: $ROOT/$name.pytest.log)"
    "$py" -m pytest -q -p no:cacheprovider -rfE --junitxml="$xml" "${tests[@]}" "$@" > "$ROOT/$name.pytest.log" 2>&1
    rc=$?
    tail -1 "$ROOT/$name.pytest.log"
    counts=$("$py" - "$xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("-\t-\t-\t-")
    raise SystemExit
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - s}\t{f}\t{e}\t{s}")
EOF
)
    result=ok
    if [ "$rc" -ne 0 ]; then
        result="pytest rc $rc"
        failed=1
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$versions" "$counts" "$result" >> "$rows"
done

echo
echo "compat summary (tests: ${#tests[@]} files)"
"$PYTHON" - "$rows" "$ROOT" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

head = ["env", "transformers", "diffusers", "peft", "accelerate", "torch", "passed", "failed", "errors", "skipped", "result"]
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" for _ in head) + "|")
for row in rows:
    print("| " + " | ".join(row) + " |")
for row in rows:  # what failed, one line each: the test and the first line of its message
    xml = Path(sys.argv[2]) / f"{row[0]}.xml"
    if not xml.exists():
        continue
    for case in ET.parse(xml).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            name = f"{case.get('classname')}::{case.get('name')}"
            print(f"{row[0]}: {bad.tag.upper()} {name}: {(msg[0] if msg else '')[:200]}")
EOF
exit "$failed"
