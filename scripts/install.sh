#!/usr/bin/env bash
# Install ollamad as a systemd service. Run as root from a checkout (it may be read-only):
#
#   sudo scripts/install.sh            install (or upgrade) and start it
#   scripts/install.sh --dry-run       print every step instead of doing it
#
# What it does: a system user `ollamad` (added to the video/render groups where they exist);
# a virtualenv under /opt/ollamad/venv with this checkout installed (built from a copy in a
# temporary folder) and `ollamad` linked into /usr/local/bin; llama-server under
# /opt/ollamad/runners/current/bin (the build runners/build.sh cached for root or for the
# user who ran sudo, else $OLLAMAD_LLAMA_SERVER or the one on PATH, else a fresh build); the
# unit /etc/systemd/system/ollamad.service; the env file /etc/ollamad/ollamad.env (an existing
# one is kept; the new one lands beside it as ollamad.env.new); models in /var/lib/ollamad/models.
# Then `systemctl daemon-reload` and `enable --now` when systemd is running (otherwise it
# prints those commands). What can fail (Python, the package build, llama-server --version)
# is done before anything outside /opt/ollamad changes; a failed first install removes it.
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

for f in pyproject.toml README.md ollamad/__init__.py systemd/ollamad.service config/ollamad.env; do
  [ -r "$src/$f" ] || die "$src/$f is missing or unreadable: run this from a complete ollamad checkout"
done

# --- llama-server: find it and check that it runs, before changing anything -------------
# Caches looked in: $OLLAMAD_RUNNERS_DIR, else root's, then (under sudo) the invoking user's.
caches=()
if [ -n "${OLLAMAD_RUNNERS_DIR:-}" ]; then
  caches+=("$OLLAMAD_RUNNERS_DIR")
else
  caches+=("${XDG_CACHE_HOME:-$HOME/.cache}/ollamad/runners")
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    sudo_home=$(getent passwd "$SUDO_USER" | cut -d: -f6 || true)
    if [ -n "$sudo_home" ]; then caches+=("$sudo_home/.cache/ollamad/runners"); fi
  fi
fi
cache=""
if [ -z "${OLLAMAD_LLAMA_SERVER:-}" ]; then
  for c in "${caches[@]}"; do
    if [ -x "$c/current/bin/llama-server" ]; then cache=$c; break; fi
  done
fi
bin=""
if [ -n "$cache" ]; then
  build=$(readlink -f "$cache/current")
  bin="$build/bin/llama-server"
elif bin="${OLLAMAD_LLAMA_SERVER:-$(command -v llama-server || true)}" && [ -n "$bin" ]; then
  [ -x "$bin" ] && [ -f "$bin" ] || die "OLLAMAD_LLAMA_SERVER=$bin is not an executable file"
fi
check_runner() {  # llama-server --version must work (a missing shared library shows here)
  local out
  if ! out=$("$1" --version 2>&1 </dev/null); then
    die "$1 cannot run: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')(a copied binary may need its shared libraries, e.g. apt-get install libgomp1)"
  fi
}
[ -z "$bin" ] || check_runner "$bin"

# --- the package in a virtualenv (built from a copy: the checkout may be read-only) ------
fresh=0
[ -e "$PREFIX" ] || fresh=1
stage=""
cleanup() {
  local code=$?
  [ -z "$stage" ] || rm -rf "$stage"
  if [ "$code" != 0 ] && [ "$fresh" = 1 ] && [ "$dry" = 0 ] && [ -e "$PREFIX" ]; then
    say "install failed; removing the $PREFIX it had started"
    rm -rf "$PREFIX"
  fi
}
trap cleanup EXIT
stage=$(mktemp -d "${TMPDIR:-/tmp}/ollamad-src.XXXXXX")
run cp -r "$src/pyproject.toml" "$src/README.md" "$src/ollamad" "$stage/"
[ -x "$PREFIX/venv/bin/python" ] || run "$py" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$stage"

# --- llama-server -----------------------------------------------------------------------
if [ -n "$cache" ]; then
  say "llama-server: the cached build $build"
  run mkdir -p "$PREFIX/runners"
  run rm -rf "$PREFIX/runners/$(basename "$build")"
  run cp -a "$build" "$PREFIX/runners/"
  run ln -sfn "$(basename "$build")" "$PREFIX/runners/current"
elif [ -n "$bin" ]; then
  say "llama-server: $bin (copied; if it needs shared libraries beside it, set OLLAMAD_LLAMA_SERVER in $CONF_DIR/ollamad.env instead)"
  run install -D -m 0755 "$bin" "$PREFIX/runners/local/bin/llama-server"
  run ln -sfn local "$PREFIX/runners/current"
else
  say "llama-server: none found in ${caches[*]}; building it (about 7 minutes on 2 cores)"
  say "  (to reuse a build: sudo OLLAMAD_RUNNERS_DIR=/home/YOU/.cache/ollamad/runners $0, or OLLAMAD_LLAMA_SERVER=/path/to/llama-server)"
  run env OLLAMAD_RUNNERS_DIR="$PREFIX/runners" "$src/runners/build.sh"
  [ "$dry" = 1 ] || check_runner "$PREFIX/runners/current/bin/llama-server"
fi

# --- user -------------------------------------------------------------------------------
if ! getent passwd "$SVC_USER" >/dev/null; then
  nologin=$(command -v nologin || echo /usr/sbin/nologin)
  run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell "$nologin" \
      --comment "ollamad model server" "$SVC_USER"
fi
for group in video render; do
  if getent group "$group" >/dev/null; then run usermod -a -G "$group" "$SVC_USER"; fi
done

# --- the client on PATH -----------------------------------------------------------------
link=/usr/local/bin/ollamad
if [ -e "$link" ] && [ "$(readlink "$link" || true)" != "$PREFIX/venv/bin/ollamad" ]; then
  say "warning: $link exists and is not ours; leaving it (the client is $PREFIX/venv/bin/ollamad)"
else
  run ln -sfn "$PREFIX/venv/bin/ollamad" "$link"
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
