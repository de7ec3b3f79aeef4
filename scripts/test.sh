#!/usr/bin/env bash
# Set up (once) and run the whole test suite: lint, types, pure core, the real llama-server
# end-to-end tests, and the systemd tier (tests/test_systemd.py: systemd in a container, as
# root where systemd-nspawn can run; it says why it skipped elsewhere; OLLAMAD_TEST_SYSTEMD=0
# turns it off). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLLAMAD_SETUP_MODELS="defaults gemma3:270m-base" "$root/scripts/setup.sh"
cd "$root"
# the systemd tier's tools, once (Debian/Ubuntu, as root): about 20 s
if [ "${OLLAMAD_TEST_SYSTEMD:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v systemd-nspawn && command -v debootstrap; } >/dev/null; then
  echo "[test] installing systemd-container and debootstrap for the systemd tier" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q systemd-container debootstrap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q systemd-container debootstrap >/dev/null; } \
    || echo "[test] warning: could not install them; the systemd tier will skip" >&2
fi
# its root filesystem and wheels, built once and cached under ~/.cache/ollamad (about 2 minutes);
# if that fails (no mirror), the tier's own set-up tries again and fails with the reason
.venv/bin/python -m tests.sysd build || echo "[test] warning: the systemd tier's root filesystem was not built" >&2
.venv/bin/ruff check ollamad tests scripts
.venv/bin/mypy
exec .venv/bin/pytest -q -ra "$@"
