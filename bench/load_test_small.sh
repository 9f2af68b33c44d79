#!/usr/bin/env bash
# A small load test against the real server: 8 clients, 16 idle streams, a 16 MiB drop, 2 s per
# phase. Fails when any call failed or the last line is not the JSON summary.
set -euo pipefail
out=$(mktemp)
"$TEST_SRCDIR/$TEST_WORKSPACE/bench/load_test" --clients=8 --sequences=2 --idle_streams=16 \
  --seconds=2 --drop_mib=16 --check --check_errors_only | tee "$out"
tail -n 1 "$out" | python3 -c '
import json, sys
summary = json.loads(sys.stdin.read())
for key in ("rps", "p99_ms", "errors", "peak_rss_mb"):
    assert key in summary, key
assert summary["errors"] == 0, summary
assert summary["rps"] > 0, summary
print("load_test_small: ok", summary)
'
