#!/usr/bin/env bash
# Remove the ollamad service that scripts/install.sh installed. Run as root:
#
#   sudo scripts/uninstall.sh            stop it; remove the unit, /opt/ollamad and the
#                                        /usr/local/bin/ollamad link (settings are kept)
#   sudo scripts/uninstall.sh --purge    also remove /etc/ollamad, the unit's drop-ins
#                                        (systemctl edit), /var/lib/ollamad (models!) and the user
#   scripts/uninstall.sh --dry-run       print every step instead of doing it
set -euo pipefail
PREFIX=/opt/ollamad
UNIT=/etc/systemd/system/ollamad.service
CONF_DIR=/etc/ollamad
STATE_DIR=/var/lib/ollamad
SVC_USER=ollamad

dry=0 purge=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) dry=1 ;;
    --purge) purge=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "uninstall: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[uninstall] %s\n' "$*" >&2; }
run() {
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
[ "$dry" = 1 ] || [ "$(id -u)" = 0 ] || { say "error: run as root (or with --dry-run)"; exit 1; }

systemd=0
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then systemd=1; fi
if [ "$systemd" = 1 ]; then
  run systemctl disable --now ollamad.service || true
else
  say "systemd is not running here; on a systemd host this runs: systemctl disable --now ollamad.service"
fi
run rm -f "$UNIT"
link=/usr/local/bin/ollamad
if [ "$(readlink "$link" 2>/dev/null || true)" = "$PREFIX/venv/bin/ollamad" ]; then run rm -f "$link"; fi
run rm -rf "$PREFIX"
if [ "$purge" = 1 ]; then
  run rm -rf "$CONF_DIR" "$STATE_DIR" "$UNIT.d"
  if getent passwd "$SVC_USER" >/dev/null; then run userdel "$SVC_USER"; fi
else
  kept="$CONF_DIR (settings)"
  [ -d "$UNIT.d" ] && kept="$kept, $UNIT.d (drop-ins)"
  say "kept $kept, $STATE_DIR (models) and the $SVC_USER user; --purge removes them"
fi
if [ "$systemd" = 1 ]; then run systemctl daemon-reload; fi
