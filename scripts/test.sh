#!/usr/bin/env bash
# The README's test command: set-up, test tools, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -x scripts/ensure_tools.sh ]; then ./scripts/ensure_tools.sh; fi
export RSTAR_TEST_HOME=${RSTAR_TEST_HOME:-$(pwd)/.rstar-test}
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
