#!/usr/bin/env bash
# Installs the Python packages the transformers integration, its tests and the accuracy harness
# need, pinned, from PyPI (python3 -m pip). Idempotent: does nothing when they are present.
#   KVSTAR_PYTHON=python3.11 deploy/install-python-deps.sh
set -euo pipefail
python=${KVSTAR_PYTHON:-python3}
pins=(torch==2.15.0 transformers==5.17.0 gguf==0.19.0 accelerate==1.15.0 numpy pytest)
if "$python" - <<'PY' 2>/dev/null; then
import importlib.metadata as m
want = {"torch": "2.15.0", "transformers": "5.17.0", "gguf": "0.19.0", "accelerate": "1.15.0"}
for name, version in want.items():
    assert m.version(name).split("+")[0] == version, name
import numpy, pytest  # noqa: F401
PY
  echo "install-python-deps: ${pins[*]} present"
  exit 0
fi
echo "install-python-deps: installing ${pins[*]} (torch brings its CUDA libraries: ~5.6 GB)"
"$python" -m pip install -q --disable-pip-version-check "${pins[@]}"
