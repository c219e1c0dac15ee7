#!/usr/bin/env bash
# The demo: a controller with the starter project and three simulated devices on this
# machine. Each device is a real thymis-agent in its own mount namespace with its own
# /nix (a "process device"). Ctrl-C stops everything and removes what it created.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
port=${THYMIS_DEMO_PORT:-8443}
root=$(mktemp -d /tmp/thymis-demo.XXXXXX)
pids=()

cleanup() {
  trap - EXIT INT TERM
  echo; echo "demo: stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT INT TERM

export THYMIS_CONTROLLER="http://127.0.0.1:$port" THYMIS_TOKEN_FILE="$root/controller/admin-token"
"$bin/thymis-controller" --state-dir "$root/controller" --listen "127.0.0.1:$port" \
  --confirm-timeout 30 >"$root/controller.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -f "$THYMIS_TOKEN_FILE" ] && curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

for n in 1 2 3; do
  dev="$root/kiosk-$n"
  mkdir -p "$dev/nix" "$dev/state"
  "$bin/thymisctl" device add "kiosk-$n" --config kiosk --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_config"])' >"$dev/agent.toml"
  printf 'state_dir = "%s"\ndbus = false\n' "$dev/state" >>"$dev/agent.toml"
  unshare --mount --propagation private -- sh -c \
    "mount --bind '$dev/nix' /nix && mount -t tmpfs tmpfs /run && exec '$PWD/$bin/thymis-agent' --config '$dev/agent.toml'" \
    >"$dev/agent.log" 2>&1 &
  pids+=($!)
done
sleep 2

cat <<TXT

Thymis demo is running.
  controller   http://127.0.0.1:$port   (log: $root/controller.log)
  admin token  $THYMIS_TOKEN_FILE
  devices      kiosk-1, kiosk-2, kiosk-3 (process devices; logs in $root/kiosk-N/agent.log)
  project      $root/controller/project  (a git repository: edit it, then deploy)

Try, in another terminal:
  export THYMIS_CONTROLLER=$THYMIS_CONTROLLER THYMIS_TOKEN_FILE=$THYMIS_TOKEN_FILE
  $PWD/$bin/thymisctl devices
  $PWD/$bin/thymisctl deploy --tag demo --wait
  $PWD/$bin/thymisctl tasks

Ctrl-C stops the demo and removes $root.
TXT
wait "${pids[0]}"
