#!/usr/bin/env bash
# Evaluate a policy (and PPM) version of the embedded model through the real services on this machine.
#
#   scripts/eval-embedded.sh POLICY PPM [rstar eval arguments ...]
#
# POLICY / PPM: a model directory, an embedded model's name, `policy@r1`-style registry versions
# (resolved in $RSTAR_HOME's store), or `-` for no PPM. The policy service always runs (vLLM, both
# cores bound); the PPM service runs when PPM is given (then `--samples N` also reports PPM
# best-of-N); the sandbox and search services run when the arguments ask for `--mcts`.
# Example (base, greedy + maj@8 + PPM best-of-8, all of gsm8k_dev100):
#   scripts/eval-embedded.sh qwen2.5-coder-0.5b-instruct ppm@r1 --dataset ../shared/data/gsm8k_dev100.jsonl \
#       --samples 8 --out docs/measurements/eval-base.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE_PORT=${BASE_PORT:-50061}
HOME_DIR=${RSTAR_HOME:-$HOME/.rstar}
POLICY=$1 PPM=$2
shift 2
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$HOME_DIR/logs"

resolve() {  # a registry version NAME@VERSION -> its local directory; anything else unchanged
  case "$1" in
    *@*) "$PY" - "$1" <<'PY'
import sys
from rstar.registry import ModelRegistry
from rstar.store import open_store
name, version = sys.argv[1].split("@", 1)
print(ModelRegistry(open_store("")).fetch(name, version))
PY
    ;;
    *) echo "$1" ;;
  esac
}

serve() {  # serve NAME PORT ARGS...: a service in the background, waited on until SERVING
  local name=$1 port=$2
  shift 2
  "$PY" -m "${name}_svc" --port "$port" --metrics-port -1 "$@" >"$HOME_DIR/logs/eval-$name.log" 2>&1 &
  PIDS+=($!)
  "$PY" - "$port" "$!" "$name" <<'PY'
import os, sys, time
from rstar_cli.stack import health
port, pid, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
while health(f"127.0.0.1:{port}", 2.0) != "SERVING":
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit(f"[eval] {name} exited; see $RSTAR_HOME/logs/eval-{name}.log")
    time.sleep(3)
print(f"[eval] {name} SERVING on {port} after {time.monotonic() - t0:.0f} s", flush=True)
PY
}

P=$BASE_PORT; Q=$((BASE_PORT + 1)); S=$((BASE_PORT + 2)); R=$((BASE_PORT + 3))
ARGS=(--policy-address "127.0.0.1:$P")
serve policy "$P" --model "$(resolve "$POLICY")"
if [ "$PPM" != "-" ]; then
  serve ppm "$Q" --model "$(resolve "$PPM")"
  ARGS+=(--ppm-address "127.0.0.1:$Q")
fi
if printf '%s\n' "$@" | grep -q -- '^--mcts$'; then
  [ "$PPM" != "-" ] || { echo "[eval] --mcts needs a PPM" >&2; exit 2; }
  serve sandbox "$S"
  serve search "$R" --policy-address "127.0.0.1:$P" --ppm-address "127.0.0.1:$Q" --sandbox-address "127.0.0.1:$S" \
    --call-timeout-s 3600 --max-concurrent-searches 8
  ARGS+=(--search-address "127.0.0.1:$R")
fi
"$PY" -m trainer eval "${ARGS[@]}" --log-level INFO "$@"
