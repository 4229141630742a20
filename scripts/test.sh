#!/usr/bin/env bash
# The README's test command: set-up, test tools, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -x scripts/ensure_tools.sh ]; then ./scripts/ensure_tools.sh; fi
# the tree viewer's browser test drives Debian's chromium (never a browser download); install it once,
# quietly; if it cannot be installed, that test skips and says why
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 \
           && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; } \
      || echo "test.sh: WARNING: could not install chromium (apt-get); the viewer's browser test will skip" >&2
fi
export RSTAR_TEST_HOME=${RSTAR_TEST_HOME:-$(pwd)/.rstar-test}
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
