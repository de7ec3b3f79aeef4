#!/usr/bin/env bash
# Install ollamad as a systemd service. Run as root from a checkout:
#
#   sudo scripts/install.sh            install (or upgrade) and start it
#   scripts/install.sh --dry-run       print every step instead of doing it
#
# What it does: a system user `ollamad` (added to the video/render groups where they exist);
# a virtualenv under /opt/ollamad/venv with this checkout installed; llama-server under
# /opt/ollamad/runners/current/bin (the build runners/build.sh cached, else
# $OLLAMAD_LLAMA_SERVER or the one on PATH, else a fresh build); the unit
# /etc/systemd/system/ollamad.service; the env file /etc/ollamad/ollamad.env (an existing
# one is kept; the new one lands beside it as ollamad.env.new); models in
# /var/lib/ollamad/models. Then `systemctl daemon-reload` and `enable --now` when systemd
# is running (otherwise it prints those commands).
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/ollamad
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/ollamad
STATE_DIR=/var/lib/ollamad
SVC_USER=ollamad

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) dry=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }
run() {  # run a command that changes the system, or print it under --dry-run
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

[ "$dry" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (or with --dry-run to see the steps)"
[ "$dry" = 1 ] && say "dry run: nothing is changed; these are the commands it would run"

# The venv links to its base Python, so that must live where the service can read it:
# ProtectHome=yes hides /home and /root (pyenv and friends install there).
py=""
for cand in ${PYTHON:-} python3.13 python3.12 python3.11 python3 /usr/local/bin/python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c '
import sys
import ensurepip, venv  # Debian: python3-venv
home = sys.base_prefix.startswith(("/home/", "/root/"))
sys.exit(sys.version_info < (3, 11) or home)' 2>/dev/null; then
    py=$(command -v "$cand"); py=$("$py" -c 'import sys, os; print(os.path.realpath(sys.executable))'); break
  fi
done
[ -n "$py" ] || die "Python 3.11 or newer, installed outside /home and /root, is needed (Debian: apt-get install python3 python3-venv; or set PYTHON=/usr/bin/python3.11)"

# --- user -------------------------------------------------------------------------------
if ! getent passwd "$SVC_USER" >/dev/null; then
  nologin=$(command -v nologin || echo /usr/sbin/nologin)
  run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell "$nologin" \
      --comment "ollamad model server" "$SVC_USER"
fi
for group in video render; do
  if getent group "$group" >/dev/null; then run usermod -a -G "$group" "$SVC_USER"; fi
done

# --- the package in a virtualenv --------------------------------------------------------
[ -x "$PREFIX/venv/bin/python" ] || run "$py" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$src"

# --- llama-server -----------------------------------------------------------------------
cache="${OLLAMAD_RUNNERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ollamad/runners}"
if [ -z "${OLLAMAD_LLAMA_SERVER:-}" ] && [ -x "$cache/current/bin/llama-server" ]; then
  build=$(readlink -f "$cache/current")
  say "llama-server: the cached build $build"
  run mkdir -p "$PREFIX/runners"
  run rm -rf "$PREFIX/runners/$(basename "$build")"
  run cp -a "$build" "$PREFIX/runners/"
  run ln -sfn "$(basename "$build")" "$PREFIX/runners/current"
elif bin="${OLLAMAD_LLAMA_SERVER:-$(command -v llama-server || true)}" && [ -n "$bin" ]; then
  [ -x "$bin" ] || die "OLLAMAD_LLAMA_SERVER=$bin is not an executable file"
  say "llama-server: $bin (copied; if it needs shared libraries beside it, set OLLAMAD_LLAMA_SERVER in $CONF_DIR/ollamad.env instead)"
  run install -D -m 0755 "$bin" "$PREFIX/runners/local/bin/llama-server"
  run ln -sfn local "$PREFIX/runners/current"
else
  say "llama-server: none found; building it (about 7 minutes on 2 cores)"
  run env OLLAMAD_RUNNERS_DIR="$PREFIX/runners" "$src/runners/build.sh"
fi

# --- unit, env file, state --------------------------------------------------------------
run install -D -m 0644 "$src/systemd/ollamad.service" "$UNIT_DIR/ollamad.service"
run install -d -m 0755 "$CONF_DIR"
if [ -e "$CONF_DIR/ollamad.env" ]; then
  say "keeping $CONF_DIR/ollamad.env; the current template is $CONF_DIR/ollamad.env.new"
  run install -m 0644 "$src/config/ollamad.env" "$CONF_DIR/ollamad.env.new"
else
  run install -m 0644 "$src/config/ollamad.env" "$CONF_DIR/ollamad.env"
fi
run install -d -m 0750 -o "$SVC_USER" -g "$SVC_USER" "$STATE_DIR" "$STATE_DIR/models"

# --- start ------------------------------------------------------------------------------
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  run systemctl daemon-reload
  run systemctl enable --now ollamad.service
  [ "$dry" = 1 ] || systemctl --no-pager --lines=0 status ollamad.service || true
else
  say "systemd is not running here; to start the service on a systemd host, run:"
  printf '  systemctl daemon-reload\n  systemctl enable --now ollamad.service\n'
fi
say "models go in $STATE_DIR/models; settings in $CONF_DIR/ollamad.env (see: $PREFIX/venv/bin/ollamad config)"
say "logs: journalctl -u ollamad -f; reload models: systemctl reload ollamad"
