#!/usr/bin/env bash
# Set up (once) and run the whole test suite: lint, types, pure core, then the real
# llama-server end-to-end tests. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
.venv/bin/ruff check ollamad tests scripts
.venv/bin/mypy
exec .venv/bin/pytest -q -ra "$@"
