#!/usr/bin/env bash
# Installs what the build and the tests need on a Debian machine, idempotently:
# the Debian packages they use and a Nix configuration that works
# without nixpkgs, a daemon or a network. Safe to run again and again.
set -euo pipefail

packages=(nix-bin busybox-static dosfstools mtools fdisk e2fsprogs zstd bmap-tools
  iproute2 nftables socat dbus dbus-bin systemd-container git curl openssl make chromium jq
  qemu-system-x86 ovmf systemd-boot-efi grub-efi-amd64-bin grub-common linux-image-amd64
  qemu-system-arm u-boot-qemu u-boot-tools postgresql btrfs-progs nginx faketime)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The tests run their own PostgreSQL, nginx and D-Bus servers: the packages' own
  # services are not started (a policy-rc.d that says no, unless the machine has one).
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$guard" ] || $sudo rm -f "$guard"
fi

# Nix from Debian ships no configuration: no build users, no daemon, no registry.
want_conf='experimental-features = nix-command flakes
build-users-group =
sandbox = false
substituters =
flake-registry = /etc/nix/flake-registry.json'
if [ ! -f /etc/nix/nix.conf ] || [ "$(cat /etc/nix/nix.conf)" != "$want_conf" ]; then
  mkdir -p /etc/nix
  printf '%s\n' "$want_conf" > /etc/nix/nix.conf
fi
[ -f /etc/nix/flake-registry.json ] || echo '{"flakes":[],"version":2}' > /etc/nix/flake-registry.json
# The host's own store (the controller's), made now so that simulated devices, which
# mount their stores over /nix, find the mount point on a machine that never ran Nix.
[ -d /nix/var/nix/db ] || nix-store --init

# Tests commit to git repositories; give git an identity if it has none.
git config --global user.email >/dev/null 2>&1 || git config --global user.email "ci@thymis.invalid"
git config --global user.name >/dev/null 2>&1 || git config --global user.name "thymis tests"

# Node.js for the browser tests (the machine's own when it has one, else Debian's).
if ! command -v npm >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$here/tests/ui/node_modules/playwright-core" ]; then
  (cd "$here/tests/ui" && npm ci --no-audit --no-fund --silent)
fi

# For the ARM board tests (`setup.sh --test-inputs`, as `make test` runs it), unpacked
# (not installed) from Debian's arm64 packages into a cache that outlives clones of the
# repository: the arm64 cloud kernel with its modules' dependency list, static busybox,
# and Nix with the libraries it loads (the board's own nix-store and nix-env); and,
# installed, Debian's Rust compiler with an aarch64 standard library and the aarch64 C
# tool chain, which build the board's agent (scripts/agent-aarch64.sh).
inputs="${THYMIS_TEST_INPUTS:-/var/cache/thymis-test-inputs}/arm64"
if [ "${1:-}" = "--test-inputs" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $sudo dpkg --add-architecture arm64
    $sudo apt-get update -qq
  fi
  cross=(rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  missing=()
  for p in "${cross[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ ! -e "$inputs/.complete" ]; then
    kernel=$(apt-cache depends linux-image-cloud-arm64:arm64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$kernel" ] || { echo "setup: no arm64 cloud kernel package found" >&2; exit 1; }
    echo "setup: fetching $kernel and busybox-static:arm64 into $inputs" >&2
    $sudo mkdir -p "$inputs"
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download -qq "$kernel" busybox-static:arm64 2>/dev/null)
    for deb in "$debs"/*.deb; do $sudo dpkg-deb -x "$deb" "$inputs"; done
    rm -rf "$debs"
    $sudo touch "$inputs/.complete"
  fi
  if [ ! -e "$inputs/.modules-complete" ]; then
    for v in "$inputs"/lib/modules/*; do $sudo depmod -b "$inputs" "$(basename "$v")"; done
    $sudo touch "$inputs/.modules-complete"
  fi
  if [ ! -e "$inputs/nix/.complete" ]; then
    echo "setup: fetching nix-bin:arm64 and its libraries into $inputs/nix" >&2
    debs=$(mktemp -d)
    libs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances nix-bin:arm64 | grep -E '^(lib[^ <]*|zlib1g):arm64$' | grep -v -- -perl | sort -u)
    # shellcheck disable=SC2086
    (cd "$debs" && apt-get download -qq nix-bin:arm64 $libs 2>/dev/null)
    mkdir -p "$debs/root"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$debs/root"; done
    $sudo rm -rf "$inputs/nix"
    $sudo mkdir -p "$inputs/nix/bin" "$inputs/nix/lib"
    $sudo cp "$debs/root/usr/bin/nix" "$inputs/nix/bin/nix"
    # The libraries nix loads, and theirs (by their DT_NEEDED entries).
    r=$debs/root
    seen=" "; todo="$r/usr/bin/nix"
    while [ -n "$todo" ]; do
      set -- $todo; f=$1; shift; todo="$*"
      for n in $(readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
        case "$seen" in *" $n "*) continue ;; esac
        seen="$seen$n "
        for d in "$r/lib/aarch64-linux-gnu" "$r/usr/lib/aarch64-linux-gnu" "$r/usr/lib/nix" "$r/usr/lib"; do
          if [ -e "$d/$n" ]; then $sudo cp -L "$d/$n" "$inputs/nix/lib/$n"; todo="$todo $d/$n"; break; fi
        done
        [ -e "$inputs/nix/lib/$n" ] || { echo "setup: nix:arm64 needs $n, which no package gave" >&2; exit 1; }
      done
    done
    rm -rf "$debs"
    $sudo touch "$inputs/nix/.complete"
  fi
fi

# The Rust toolchain's components that the checks use.
command -v rustup >/dev/null && rustup component list --installed 2>/dev/null | grep -q clippy \
  || { command -v rustup >/dev/null && rustup component add clippy rustfmt; } || true
echo "setup: ok" >&2
