#!/usr/bin/env bash
# The embedded model's self-evolution rounds on 2 CPU cores, one resumable step at a time.
#
#   scripts/evolve-embedded.sh synth1 | train1 | synth2 | train2
#
# synthN runs round N's synthesis against a local policy service (vLLM, both cores bound):
# round 1 = GSM8K reference conversion + terminal-guided MCTS with the base model; round 2 =
# PPM-augmented MCTS with policy r1 + PPM r1 on a fresh slice of the pools. trainN trains policy rN
# (LoRA) and PPM rN (value head on the frozen rN backbone) from the stored trees. Every step
# resumes where a killed run stopped (stored shards, checkpoints, published versions are kept).
# Settings: env RSTAR_HOME (store, work dir), DATA (the shared data folder), PORT (policy service).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
PORT=${PORT:-50061}
PPM_PORT=$((PORT + 1))
HOME_DIR=${RSTAR_HOME:-$HOME/.rstar}
LIMIT=${POOL_LIMIT:-12}     # problems per pool file and round
SHARDS=${SHARDS:-4}         # synthesis shards run at once: the policy service batches them continuously
COMMON=(--pool "$DATA/gsm8k_train.jsonl,$DATA/math_train.jsonl" --pool-limit "$LIMIT"
        --dev "$DATA/gsm8k_dev100.jsonl" --exclude "$DATA/math_dev100.jsonl"
        --shards "$SHARDS" --chunk 4 --candidates 4 --rollouts 8,16 --max-depth 12 --max-step-tokens 128
        --markers none --lora-r 16 --sft-lr 2e-4 --sft-epochs 2 --sft-batch-size 16 --sft-micro-batch 2
        --sft-max-length 2048 --ppm-mode head --ppm-batch-size 64 --ppm-epochs 20 --ppm-from-round 2
        --ppm-holdout 0.25
        --progress false)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

serve() {  # serve NAME MODULE PORT MODEL_DIR: a service in the background, waited on until SERVING
  local name=$1 module=$2 port=$3 model=$4
  echo "[evolve] starting $name ($model) on 127.0.0.1:$port"
  "$PY" -m "$module" --model "$model" --port "$port" --metrics-port -1 >"$HOME_DIR/logs/evolve-$name.log" 2>&1 &
  PIDS+=($!)
  "$PY" - "$port" "$!" <<'PY'
import os, sys, time
from rstar_cli.stack import health
port, pid = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
while health(f"127.0.0.1:{port}", 2.0) != "SERVING":
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit(f"[evolve] the service on port {port} exited; see its log in $RSTAR_HOME/logs")
    time.sleep(3)
print(f"[evolve] SERVING after {time.monotonic() - t0:.0f} s", flush=True)
PY
}

version_dir() {  # version_dir NAME VERSION: the registry's local copy of a version
  "$PY" - "$1" "$2" <<'PY'
import sys
from rstar.registry import ModelRegistry
from rstar.store import open_store
print(ModelRegistry(open_store("")).fetch(sys.argv[1], sys.argv[2]))
PY
}

mkdir -p "$HOME_DIR/logs"
evolve() { "$PY" -m trainer evolve "${COMMON[@]}" "$@"; }
synthesize() {  # synthesize ROUND ARGS...: every shard at once (one process each), then the summary
  local round=$1 pids=() rc=0
  shift
  for ((s = 0; s < SHARDS; s++)); do
    evolve --stage synthesis --round "$round" --shard "$s" "$@" >"$HOME_DIR/logs/evolve-synth$round-$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  tail -n 3 "$HOME_DIR"/logs/evolve-synth"$round"-*.log
  return $rc
}
case "${1:-}" in
  synth1)
    serve policy policy_svc "$PORT" default
    synthesize 1 --bootstrap reference+policy --policy-address "127.0.0.1:$PORT" ;;
  train1)
    evolve --stage train-policy --round 1
    evolve --stage train-ppm --round 1 ;;
  synth2)
    serve policy policy_svc "$PORT" "$(version_dir policy r1)"
    serve ppm ppm_svc "$PPM_PORT" "$(version_dir ppm r1)"
    synthesize 2 --pool-offset "$LIMIT" --policy-address "127.0.0.1:$PORT" --ppm-address "127.0.0.1:$PPM_PORT" ;;
  train2)
    evolve --stage train-policy --round 2
    evolve --stage train-ppm --round 2 ;;
  *) echo "usage: $0 synth1|train1|synth2|train2" >&2; exit 2 ;;
esac
