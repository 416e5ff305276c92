#!/usr/bin/env bash
# End-to-end tests against a real Label Studio server: one command.
#
#   scripts/e2e.sh                 # all e2e tests
#   scripts/e2e.sh -k webhook      # extra arguments go to pytest
#
# Label Studio runs from its own venv: $LS_VENV if set (used as is), else .e2e/ls-venv, which is
# created on first use (~1 GB, about a minute). The tests run with the backend's interpreter:
# $BACKEND_PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

LS_PIN="label-studio==1.23.2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$SECONDS

python_for_venv="${PYTHON:-python3}"
if [[ -n "${BACKEND_PYTHON:-}" ]]; then
    backend_python="$BACKEND_PYTHON"
elif [[ -x .venv/bin/python ]]; then
    backend_python=.venv/bin/python
else
    backend_python=python3
fi

ls_version() {  # prints the installed label-studio version of venv $1, or nothing
    "$1/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true
}

if [[ -n "${LS_VENV:-}" ]]; then
    ls_venv="$LS_VENV"
    have="$(ls_version "$ls_venv")"
    [[ -n "$have" ]] || { echo "e2e: LS_VENV=$ls_venv has no label-studio; install $LS_PIN there" >&2; exit 2; }
    [[ "$have" == "${LS_PIN#*==}" ]] || echo "e2e: warning: LS_VENV has label-studio $have, tests were written for ${LS_PIN#*==}" >&2
else
    ls_venv="$ROOT/.e2e/ls-venv"
    if [[ "$(ls_version "$ls_venv")" != "${LS_PIN#*==}" ]]; then
        echo "e2e: installing $LS_PIN into .e2e/ls-venv (once; about a minute)"
        t_install=$SECONDS
        rm -rf "$ls_venv"
        mkdir -p "$ROOT/.e2e"
        "$python_for_venv" -m venv "$ls_venv"
        "$ls_venv/bin/pip" install --quiet --disable-pip-version-check "$LS_PIN"
        echo "e2e: Label Studio installed in $((SECONDS - t_install)) s"
    fi
fi

echo "e2e: Label Studio venv $ls_venv ($(ls_version "$ls_venv")), tests with $backend_python"
status=0
LS_VENV="$ls_venv" GEM_E2E_REQUIRED=1 "$backend_python" -m pytest tests/e2e -v -rfEs --durations=5 "$@" || status=$?
echo "e2e: finished in $((SECONDS - t0)) s (exit $status)"
exit $status
