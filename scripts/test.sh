#!/usr/bin/env bash
# Run the whole test suite from a clean checkout, exactly as CI does (.ci/run only adds
# GEM_E2E_REQUIRED=1): installs the system packages the tests need when it can (root and apt-get:
# Chromium for the browser tests; docker.io, docker-compose and debootstrap for the Docker stage),
# creates the virtual environments (the backend's in .venv, Label Studio's in .e2e/ls-venv),
# prepares the Docker stage (scripts/docker_stage.py: engine, base images, the backend image),
# then runs pytest. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k regions`.
#
# What cannot be installed here is skipped; the end of the run names the skipped groups and the
# command that enables them. With GEM_E2E_REQUIRED=1 a skipped group fails the run.
# GEM_SKIP_DOCKER=1 leaves the Docker stage out (a skip like any other).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LS_VENV=${LS_VENV:-.e2e/ls-venv}
export LS_VENV

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
required() { case "${GEM_E2E_REQUIRED:-}" in 1|true|yes|on) return 0;; *) return 1;; esac; }

# ---- system packages, by group -----------------------------------------------------------------
declare -A GROUP_PACKAGES=([browser]="chromium" [docker]="docker.io docker-compose debootstrap")
SKIPPED=()        # "group: why"
STAGE_FAILED=""
missing_packages() {   # the group's Debian packages whose program is missing
    case "$1" in
        browser) [ -x /usr/bin/chromium ] || [ -n "${GEM_CHROMIUM:-}" ] || echo chromium ;;
        docker)
            command -v dockerd >/dev/null 2>&1 || echo docker.io
            command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || echo docker-compose
            command -v debootstrap >/dev/null 2>&1 || echo debootstrap ;;
    esac
}
wanted=()
for group in browser docker; do
    [ "$group" = docker ] && [ "${GEM_SKIP_DOCKER:-0}" = 1 ] && continue
    wanted+=($(missing_packages "$group"))
done
if [ ${#wanted[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing ${wanted[*]} (apt-get)"
        started=$(date +%s)
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${wanted[@]}" >/dev/null) || echo "warning: apt-get could not install ${wanted[*]}" >&2
        echo "system packages took $(( $(date +%s) - started )) s"
    fi
    for group in browser docker; do
        still=$(missing_packages "$group" | xargs)
        [ -n "$still" ] && SKIPPED+=("$group: $still missing")
    done
fi

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

# ---- the Docker stage: engine, base images (or stand-ins), the backend image -------------------
# tests/e2e/test_docker_stack.py then starts the compose stack on what this prepared.
if [ "${GEM_SKIP_DOCKER:-0}" = 1 ] || [ "${GEM_SKIP_E2E:-0}" = 1 ]; then
    SKIPPED+=("docker: GEM_SKIP_DOCKER/GEM_SKIP_E2E set")
elif [ -z "$(missing_packages docker)" ]; then
    step "Docker stage (scripts/docker_stage.py)"
    # Stops only a dockerd this run started, whatever way the run ends.
    trap '"$PYTHON" scripts/docker_stage.py stop' EXIT
    set +e
    "$PYTHON" scripts/docker_stage.py prepare --python "$VENV/bin/python"
    rc=$?
    set -e
    case $rc in
        0) ;;
        3) SKIPPED+=("docker: no Docker engine could be started (root needed)") ;;
        *) STAGE_FAILED="the Docker stage failed (exit $rc): see its output above" ;;
    esac
fi

step "running tests"
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -ra "$@"
code=$?
set -e
echo "test suite took $(( $(date +%s) - start )) s"

if [ -n "$STAGE_FAILED" ]; then
    echo "FAILED: $STAGE_FAILED" >&2
    [ $code -ne 0 ] || code=1
fi
if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo
    echo "Skipped test groups (their tests skipped; under GEM_E2E_REQUIRED=1 they fail):"
    for entry in "${SKIPPED[@]}"; do echo "  - $entry"; done
    packages=$( (missing_packages browser; missing_packages docker) | xargs)
    rerun="GEM_SKIP_DOCKER=0 GEM_SKIP_E2E=0 bash scripts/test.sh"
    echo "To run them:"
    if [ -z "$packages" ]; then
        echo "  $rerun"
    elif [ "$(id -u)" != 0 ]; then
        echo "  sudo bash scripts/test.sh      # as root it installs $packages itself"
    else
        echo "  apt-get update && apt-get install -y $packages && $rerun"
    fi
    if required; then
        echo "FAILED: GEM_E2E_REQUIRED=1 and ${#SKIPPED[@]} group(s) skipped" >&2
        [ $code -ne 0 ] || code=1
    fi
fi
exit $code
