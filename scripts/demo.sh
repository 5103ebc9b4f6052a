#!/usr/bin/env bash
# The main job on one machine: a management server (embedded OIDC issuer, SQLite), two
# peers in single-machine mode (a "laptop" you connect from and "server-1" serving SSH),
# a device-flow login, and a first SSH login with meshssh and with native OpenSSH.
#
#   ./scripts/demo.sh            run it, leave everything running until Ctrl-C
#   DEMO_EXIT=1 ./scripts/demo.sh  run it and stop (used by the test suite)
#
# Everything lives in ./demo-state (recreated each run). As root the demo creates an OS
# user "meshdemo" to log in as; otherwise you log in as yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "${DEMO_SKIP_INSTALL:-0}" = 1 ] || scripts/install-deps.sh
export PATH="$ROOT/.venv/bin:$PATH"
PY="$ROOT/.venv/bin/python"

STATE="$ROOT/demo-state"
rm -rf "$STATE"; mkdir -p "$STATE"; chmod 700 "$STATE"
export MESHSSH_CONFIG_DIR="$STATE/client"
PIDS=()
cleanup() {
  meshssh control stop >/dev/null 2>&1 || true  # the control master meshssh started (docs/client.md)
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${CREATED_USER:-}" ]; then userdel -r -f "$CREATED_USER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$(id -u)" = 0 ]; then
  LOGIN=meshdemo
  if ! id "$LOGIN" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$LOGIN"; usermod -p '*' "$LOGIN"; CREATED_USER=$LOGIN
  fi
else
  LOGIN=$(id -un)
fi
EMAIL="$LOGIN@example.com"
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/user.password"
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/admin.password"
chmod 600 "$STATE"/*.password
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MGMT="http://127.0.0.1:$PORT"
# A loopback /16 of its own, so the demo never collides with another mesh on this machine.
NET="127.$(( (RANDOM % 100) + 100 )).0.0/16"

say "management server on $MGMT (SQLite in demo-state/mgmt, mesh network $NET)"
meshmgmt init --data-dir "$STATE/mgmt" --admin-email admin@example.com --admin-password-stdin < "$STATE/admin.password"
meshmgmt serve --data-dir "$STATE/mgmt" --listen "127.0.0.1:$PORT" --network "$NET" \
  > "$STATE/mgmt.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -fs "$MGMT/healthz" >/dev/null 2>&1 && break; \
  "$PY" -c "import urllib.request,sys; urllib.request.urlopen('$MGMT/healthz')" 2>/dev/null && break; sleep 0.1; done

say "admin: a user, two groups, a setup key and an SSH policy"
admin() { meshmgmt --url "$MGMT" --token-file "$STATE/mgmt/admin.token" "$@"; }
admin users create "$EMAIL" --name "Demo User" --password-stdin < "$STATE/user.password"
admin groups create laptops --user "$EMAIL"
admin groups create servers
admin policies create ssh-to-servers --source laptops --destination servers --protocol ssh --local-user localpart
KEY_SERVERS=$(admin --json setup-keys create --name servers --reusable --auto-group servers | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key"])')
KEY_LAPTOPS=$(admin --json setup-keys create --name laptops --reusable --auto-group laptops | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key"])')

say "peers: server-1 serves SSH (with SFTP), laptop is where you connect from"
meshsshd up --management-url "$MGMT" --setup-key "$KEY_SERVERS" --hostname server-1 \
  --allow-server-ssh --enable-ssh-sftp --dataplane none --state-dir "$STATE/server-1" \
  > "$STATE/server-1.log" 2>&1 & PIDS+=($!)
meshsshd up --management-url "$MGMT" --setup-key "$KEY_LAPTOPS" --hostname laptop \
  --dataplane none --state-dir "$STATE/laptop" > "$STATE/laptop.log" 2>&1 & PIDS+=($!)
for _ in $(seq 150); do   # server-1 serving, with laptop (the source its policy allows) in its map
  meshsshd status --state-dir "$STATE/server-1" --json 2>/dev/null | tr -d '\n ' \
    | grep '"serving":true' | grep -q '"name":"laptop"' && break; sleep 0.2
done
meshsshd status --state-dir "$STATE/server-1"

say "login: the device flow (the demo approves it as $EMAIL, as you would in a browser)"
meshssh login --management-url "$MGMT" --no-browser 2> "$STATE/login.txt" & LOGIN_PID=$!
for _ in $(seq 100); do grep -q "user_code=" "$STATE/login.txt" 2>/dev/null && break; sleep 0.1; done
cat "$STATE/login.txt"
URL=$(grep -o 'http[^ ]*user_code=[A-Z-]*' "$STATE/login.txt" | head -1)
"$PY" scripts/demo_browser.py "$URL" "$EMAIL" "$STATE/user.password"
wait "$LOGIN_PID"

say "first SSH login: meshssh $LOGIN@server-1"
meshssh "$LOGIN@server-1" 'echo "hello from $(hostname) as $(id -un) (uid $(id -u)), SSH_CONNECTION=$SSH_CONNECTION"'

say "the same through native OpenSSH and the generated drop-in"
meshssh config install --path "$STATE/ssh"
ssh -F "$STATE/ssh/99-meshssh.conf" "$LOGIN@server-1" 'echo "native ssh: $(id -un) on $(hostname)"'

say "done — management log: demo-state/mgmt.log, peer logs: demo-state/*.log"
ENVS="MESHSSH_CONFIG_DIR=$MESHSSH_CONFIG_DIR"   # meshssh finds the laptop peer as its source itself
echo "Everything keeps running. Log in again from another terminal, with meshssh or native ssh:"
echo "  $ENVS $ROOT/.venv/bin/meshssh $LOGIN@server-1"
echo "  $ENVS ssh -F $STATE/ssh/99-meshssh.conf $LOGIN@server-1"
if [ "${DEMO_EXIT:-0}" != 1 ]; then
  echo "Ctrl-C stops it."
  wait
fi
