#!/usr/bin/env bash
# Installs what meshsshd, its tests and its demo need on a fresh Debian machine:
# the Debian packages (as root) and the Python packages into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  openssh-client openssh-sftp-server openssh-server
  nftables wireguard-tools wireguard-go iproute2
  postgresql procps passwd login util-linux tmux
  putty-tools dropbear-bin curl
  systemd   # systemd-analyze: the units are verified and scored offline (no running systemd needed)
)
# node's ssh2 is one of the SFTP clients the tests drive. A node that came with its own
# npm (NodeSource's nodejs conflicts with Debian's npm package) is used as it is.
command -v npm >/dev/null || DEBIAN_PACKAGES+=(nodejs npm)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The reference sshd must not run as a system service; tests start their own.
  if command -v systemctl >/dev/null && systemctl is-active -q ssh 2>/dev/null; then :; fi
  mkdir -p /run/sshd
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's own chatter (index warnings, build output) goes to a log; shown only on failure.
LOG=.venv/install.log
if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >"$LOG" 2>&1; then
  tail -n 40 "$LOG" >&2
  echo "install-deps: pip failed; the whole log is in $LOG" >&2
  exit 1
fi
# The same for npm, from the committed lock file. --ignore-scripts: ssh2's optional native
# crypto binding would need a compiler; its pure-JavaScript fallback is what the tests need.
if command -v npm >/dev/null; then
  NODE_LOG=.venv/npm-install.log
  if ! npm ci --prefix tests/clients/node --ignore-scripts --omit=optional --no-audit --no-fund >"$NODE_LOG" 2>&1; then
    tail -n 40 "$NODE_LOG" >&2
    echo "install-deps: npm ci failed; the whole log is in $NODE_LOG" >&2
    exit 1
  fi
fi
