#!/usr/bin/env bash
# Set up (once) and run the daemon on the built-in default: the project-built llama-server
# and the default models (smollm2:135m, all-minilm, tiny), on 127.0.0.1:11434 unless OLLAMA_HOST
# says otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/ollamad" serve "$@"
