#!/usr/bin/env bash
# Remove the ollamad service that scripts/install.sh installed. Run as root:
#
#   sudo scripts/uninstall.sh            stop it; remove the unit and /opt/ollamad
#   sudo scripts/uninstall.sh --purge    also remove /etc/ollamad, /var/lib/ollamad (models!)
#                                        and the ollamad user
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
run rm -rf "$UNIT.d"
[ "$systemd" = 1 ] && run systemctl daemon-reload
run rm -rf "$PREFIX"
if [ "$purge" = 1 ]; then
  run rm -rf "$CONF_DIR" "$STATE_DIR"
  if getent passwd "$SVC_USER" >/dev/null; then run userdel "$SVC_USER"; fi
else
  say "kept $CONF_DIR (settings), $STATE_DIR (models) and the $SVC_USER user; --purge removes them"
fi
