#!/usr/bin/env bash
# The fleet suites that touch the database, again on PostgreSQL (a private server each).
# They run from the executables `cargo test --workspace` just built: asking cargo for a
# few test targets instead resolves dependencies' features for that subset and builds
# much of the workspace again.
set -euo pipefail
cd "$(dirname "$0")/.."
suites=${THYMIS_PG_SUITES:-"deploy rollout faults crash_windows staging secrets"}
bins=$(cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
want = set(sys.argv[1].split())
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("kind") == ["test"] and t.get("name") in want and m.get("executable"):
        print(m["executable"])
' "$suites")
[ "$(echo "$bins" | wc -w)" -eq "$(echo "$suites" | wc -w)" ] || { echo "test-postgres: not every suite was found: $bins" >&2; exit 1; }
for bin in $bins; do
  echo "     Running $bin on PostgreSQL"
  (cd tests && THYMIS_TEST_DATABASE=postgres "$bin")
done
