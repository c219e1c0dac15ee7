#!/usr/bin/env bash
# Refreshes the screenshots the README and docs/ui.md show: the web UI test (a real
# Chromium against a real controller and devices) writes every page to artifacts/ui/;
# these are the ones kept in docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --test ui
for shot in tag-devices tag-task staged-task staged-deploy canary-task device-page device-terminal device-refusing device-unenrolled; do
  cp "artifacts/ui/$shot.png" "docs/screenshots/$shot.png"
done
echo "docs/screenshots/ refreshed"
