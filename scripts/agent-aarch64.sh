#!/usr/bin/env bash
# Builds thymis-agent for aarch64 (the ARM board test runs it inside the board) with
# Debian's rustc-web and its aarch64 standard library (`setup.sh --test-inputs`
# installs them), and copies it to $THYMIS_TEST_INPUTS/arm64/thymis-agent.
#
# Its target directory lives in the test inputs cache, so a fresh clone recompiles only
# the project's own crates; and a binary made from the same sources (the agent's crates,
# Cargo.lock, the compiler) is reused as it is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
inputs="${THYMIS_TEST_INPUTS:-/var/cache/thymis-test-inputs}/arm64"
out="$inputs/thymis-agent"
target=aarch64-unknown-linux-gnu

[ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/$target ] \
  || { echo "agent-aarch64: no aarch64 Rust standard library (run scripts/setup.sh --test-inputs)" >&2; exit 1; }

# What the binary is made from.
stamp=$(cd "$here" && {
  /usr/bin/rustc --version
  { git ls-files -co --exclude-standard -z Cargo.toml Cargo.lock daemon crates 2>/dev/null \
    || find Cargo.toml Cargo.lock daemon crates -type f -print0; } | sort -z | xargs -0 sha256sum
} | sha256sum | cut -d' ' -f1)
if [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "agent-aarch64: $out is up to date" >&2
  exit 0
fi

echo "agent-aarch64: building thymis-agent for $target (minutes on two cores the first time)" >&2
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# The debug profile (dependencies at opt-level 1): half the build time of release.
cargo build --quiet --manifest-path "$here/Cargo.toml" --target $target -p thymis-agent \
  --target-dir "$inputs/target"
cp "$inputs/target/$target/debug/thymis-agent" "$out.tmp"
aarch64-linux-gnu-strip "$out.tmp"
mv "$out.tmp" "$out"
echo "$stamp" > "$out.stamp"
echo "agent-aarch64: built $out" >&2
