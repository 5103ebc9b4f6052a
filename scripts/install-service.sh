#!/usr/bin/env bash
# Installs meshsshd and meshmgmt on a server, from this checkout (or a wheel built from it):
#
#   /opt/meshsshd/                       a venv holding the package and its dependencies
#   /usr/local/bin/{meshsshd,meshmgmt,meshssh}   symlinks into it (the units' ExecStart)
#   /usr/local/share/man/man1/*.1        symlinks to its man pages (the units' Documentation=)
#   /usr/local/lib/systemd/system/       meshsshd.service, meshmgmt.service (replaced on upgrade)
#   /etc/meshsshd/meshsshd.toml          the example config, only if there is none
#   /etc/pam.d/meshsshd                  the PAM file, only if there is none
#
# Why a venv in /opt: Debian's python3 refuses `pip install` into the system (PEP 668), and
# the dependencies must not be mixed with, or broken by, apt's Python packages. The venv is
# replaced as a whole by nobody but this script; the symlinks put the commands where the units
# expect them. Units go to /usr/local/lib/systemd/system, not /etc/systemd/system: they are
# ours and replaced on every upgrade, while an admin's changes belong in drop-ins
# (`systemctl edit meshsshd`), which /etc keeps and which override ours.
#
# Idempotent: a second run with the same sources changes nothing and says so for each step.
# `--root DIR` (or DESTDIR=DIR) installs below DIR instead of /, for tests; the venv then only
# works at that place. systemd is reloaded only when it runs and --root is /; units are
# enabled only with --enable.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "$0")/.." && pwd)
PROGRAM=install-service
VENV=/opt/meshsshd
BIN_DIR=/usr/local/bin
MAN_DIR=/usr/local/share/man/man1
UNIT_DIR=/usr/local/lib/systemd/system
COMMANDS=(meshsshd meshmgmt meshssh)
UNITS=(meshsshd.service meshmgmt.service)
STAMP=installed-wheel.record-sha256   # in the venv: which build it holds

usage() {
  cat <<EOF
usage: $0 [--root DIR] [--wheel FILE] [--enable UNIT]...

Installs meshsshd, meshmgmt and meshssh into $VENV, their commands into $BIN_DIR, the
systemd units, the example config and the PAM file (see the top of this script). Run as root.

  --root DIR     install below DIR instead of / (also: DESTDIR=DIR); for tests
  --wheel FILE   install this wheel instead of building one from $SRC
  --enable UNIT  also enable UNIT (meshsshd or meshmgmt) and start it (with --root: enable only)
EOF
}

say() { printf '%s: %s\n' "$PROGRAM" "$*"; }
die() { printf '%s: error: %s\n' "$PROGRAM" "$*" >&2; exit 1; }

ROOT=${DESTDIR:-/}
WHEEL=
ENABLE=()
while [ $# -gt 0 ]; do
  case $1 in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$2; shift 2 ;;
    --wheel=*) WHEEL=${1#--wheel=}; shift ;;
    --enable) [ $# -ge 2 ] || die "--enable needs meshsshd or meshmgmt"; ENABLE+=("${2%.service}"); shift 2 ;;
    --enable=*) v=${1#--enable=}; ENABLE+=("${v%.service}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for unit in "${ENABLE[@]}"; do
  case $unit in meshsshd|meshmgmt) ;; *) die "--enable $unit: the units are meshsshd and meshmgmt" ;; esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0): it writes $VENV, $BIN_DIR, /etc and the units"
[ -d "$ROOT" ] || die "--root $ROOT is not a directory: create it first"
ROOT=$(cd "$ROOT" && pwd)
R=${ROOT%/}   # prefix for every target path; empty for /
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
[ -z "$WHEEL" ] || WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")

# Root acts only on directories that root alone can change: a venv or target directory that
# another user owns or may write could swap what root installs or runs.
check_root_owned() {
  local path=$1 owner mode
  [ -e "$path" ] || return 0
  [ ! -L "$path" ] || die "$path is a symlink; remove it (rm $path) and run again"
  read -r owner mode < <(stat -c '%u %a' "$path")
  [ "$owner" = 0 ] || die "$path belongs to uid $owner, not root: remove it or chown -R root: it"
  (( (8#$mode & 8#022) == 0 )) || die "$path is writable by group or others (mode $mode): chmod go-w $path"
}

# Copies SRC to DEST (mode MODE) unless DEST has the same content; REPLACE=no keeps any DEST.
place_file() {
  local src=$1 dest=$2 mode=$3 replace=$4 what=$5
  mkdir -p "$(dirname "$dest")"
  check_root_owned "$(dirname "$dest")"
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    if cmp -s "$src" "$dest"; then
      say "$what: $dest unchanged"
      return
    fi
    if [ "$replace" = no ]; then
      say "$what: $dest kept as it is (yours; the shipped one is $src)"
      return
    fi
  fi
  install -o root -g root -m "$mode" "$src" "$dest.new"
  mv -f "$dest.new" "$dest"
  say "$what: $dest installed"
}

# Points LINK at TARGET (relative, so it also holds below --root); false if it already did.
link_to() {
  local target=$1 link=$2
  mkdir -p "$(dirname "$link")"
  check_root_owned "$(dirname "$link")"
  [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ] && return 1
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$link exists and is not our symlink (another installation?): remove it (rm $link) and run again"
  fi
  ln -sfn "$target" "$link"
}

# The path from directory FROM to TARGET, both absolute below the same root.
relative() { realpath -ms --relative-to="$1" "$2"; }

# --- the package, in its venv --------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "$PY not found: apt-get install python3 python3-venv"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$("$PY" -V) is too old: meshsshd needs Python 3.11 or newer (Debian 12 has it)"
"$PY" -c 'import ensurepip' 2>/dev/null || die "$PY cannot make venvs: apt-get install python3-venv"

mkdir -p "$R/opt"
check_root_owned "$R/opt"
check_root_owned "$R$VENV"
if [ -x "$R$VENV/bin/python" ]; then
  say "venv: $R$VENV unchanged"
else
  "$PY" -m venv "$R$VENV"
  say "venv: $R$VENV created"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
pip_quietly() {
  if ! "$R$VENV/bin/pip" "$@" >"$WORK/pip.log" 2>&1; then
    tail -n 30 "$WORK/pip.log" >&2
    die "pip $1 failed (above); fix that and run again"
  fi
}
if [ -z "$WHEEL" ]; then
  # Built from a copy: an in-tree build leaves root-owned build/ files in the checkout, and
  # stale ones there would end up in the wheel.
  mkdir "$WORK/src" "$WORK/wheel"
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
  pip_quietly wheel --no-deps -w "$WORK/wheel" "$WORK/src"
  WHEEL=$(echo "$WORK"/wheel/*.whl)
fi
# A wheel's RECORD lists the hash of every file in it: the same RECORD, the same build.
record_hash=$("$R$VENV/bin/python" - "$WHEEL" <<'EOF'
import hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    print(hashlib.sha256(wheel.read(record)).hexdigest())
EOF
) || die "$WHEEL is not a wheel"
if [ -f "$R$VENV/$STAMP" ] && [ "$(cat "$R$VENV/$STAMP")" = "$record_hash" ]; then
  say "package: $(basename "$WHEEL") unchanged in $R$VENV"
else
  pip_quietly install --no-deps --force-reinstall "$WHEEL"
  pip_quietly install "$WHEEL"   # its dependencies, new ones after an upgrade
  echo "$record_hash" >"$R$VENV/$STAMP"
  say "package: $(basename "$WHEEL") installed in $R$VENV"
fi

# --- commands and man pages ------------------------------------------------------------
for cmd in "${COMMANDS[@]}"; do
  [ -x "$R$VENV/bin/$cmd" ] || die "$VENV/bin/$cmd is missing after the install: is $WHEEL a meshsshd wheel?"
  if link_to "$(relative "$BIN_DIR" "$VENV/bin/$cmd")" "$R$BIN_DIR/$cmd"; then
    say "command: $R$BIN_DIR/$cmd -> $VENV/bin/$cmd"
  else
    say "command: $R$BIN_DIR/$cmd unchanged"
  fi
done
pages=0 new_pages=0
for page in "$R$VENV"/share/man/man1/*.1; do
  [ -e "$page" ] || die "the package holds no man pages ($VENV/share/man/man1)"
  pages=$((pages + 1))
  if link_to "$(relative "$MAN_DIR" "$VENV/share/man/man1/${page##*/}")" "$R$MAN_DIR/${page##*/}"; then
    new_pages=$((new_pages + 1))
  fi
done
# Links to pages an upgrade dropped would dangle: remove those that point into our venv.
stale=$(find "$R$MAN_DIR" -maxdepth 1 -type l -lname "*$VENV/share/man/man1/*" ! -exec test -e {} \; -print -delete | wc -l)
say "man pages: $pages in $R$MAN_DIR, $new_pages of them new, $stale stale removed"

# --- units, config, PAM ----------------------------------------------------------------
for unit in "${UNITS[@]}"; do
  place_file "$SRC/deploy/$unit" "$R$UNIT_DIR/$unit" 0644 yes unit
  # A whole copy in /etc (an older manual install) shadows ours; drop-ins (unit.d/) do not.
  if [ -f "$R/etc/systemd/system/$unit" ]; then
    say "unit: note: $R/etc/systemd/system/$unit overrides $UNIT_DIR/$unit; remove it to use the" \
      "new one, or keep your changes as a drop-in (systemctl edit ${unit%.service})"
  fi
done
place_file "$SRC/deploy/meshsshd.example.toml" "$R/etc/meshsshd/meshsshd.toml" 0644 no config
place_file "$SRC/deploy/pam.d/meshsshd" "$R/etc/pam.d/meshsshd" 0644 no PAM

# --- systemd -----------------------------------------------------------------------------
# /run/systemd/system exists exactly when systemd is PID 1 (sd_booted(3)).
if [ -n "$R" ]; then
  say "systemd: not reloaded (installed below $ROOT)"
  for unit in "${ENABLE[@]}"; do
    systemctl --root="$ROOT" enable "$unit.service" || die "systemctl --root=$ROOT enable $unit failed (above)"
  done
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload || die "systemctl daemon-reload failed (above)"
  say "systemd: daemon-reload done"
  for unit in "${ENABLE[@]}"; do
    systemctl enable --now "$unit.service" || die "systemctl enable --now $unit failed (above); journalctl -u $unit says why"
  done
else
  say "systemd: not running here (PID 1 is $(cat /proc/1/comm)); units are in place for when it is"
  [ ${#ENABLE[@]} -eq 0 ] || die "--enable needs a running systemd; start the daemons by hand (meshsshd up, meshmgmt serve)"
fi
for unit in "${ENABLE[@]}"; do say "systemd: $unit enabled"; done
if [ ${#ENABLE[@]} -eq 0 ]; then
  say "next: register this peer once (meshsshd up --management-url URL --setup-key KEY ...), then" \
    "systemctl enable --now meshsshd; for management see the top of $UNIT_DIR/meshmgmt.service"
fi
