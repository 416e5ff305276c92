#!/usr/bin/env bash
# Run the whole test suite from a clean checkout: creates the virtual environments it needs
# (the backend's in .venv, Label Studio's in .e2e/ls-venv), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k regions`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LS_VENV=${LS_VENV:-.e2e/ls-venv}
export LS_VENV

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
step "installing requirements-dev.txt into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, open_clip, flask, label_studio_sdk" \
    || { echo "dependency install failed" >&2; exit 1; }

if [ "${GEM_SKIP_E2E:-0}" != "1" ]; then
    if [ ! -x "$LS_VENV/bin/label-studio" ]; then
        step "installing label-studio==1.23.2 into $LS_VENV (its own environment)"
        mkdir -p "$(dirname "$LS_VENV")"
        "$PYTHON" -m venv "$LS_VENV"
        "$LS_VENV/bin/pip" install -q --disable-pip-version-check label-studio==1.23.2 2>&1 | grep -v "is ignored" || true
    fi
fi

step "running tests"
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -ra "$@"
code=$?
set -e
echo "test suite took $(( $(date +%s) - start )) s"
exit $code
