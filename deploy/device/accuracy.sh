#!/usr/bin/env bash
# Runs the accuracy harness (eval/accuracy.py) on the GPU machine, which has torch and transformers
# but no Debian packages, no gguf package and no network, and takes at most 64 MiB per call.
# What it needs travels over consecutive calls in ignored folders (see docs/accuracy-harness.md):
#   deploy/device/accuracy.sh stash DIR...     copy DIR's files to /tmp/kvstar-stash (early calls)
#   deploy/device/accuracy.sh run DIR [ARGS]   stash DIR too, then: join the model parts, check
#                                              the sha256, unpack the binaries, install gguf and run
#                                              eval/accuracy.py ARGS; results land in $OUT
# The stash holds: device.tar.xz (deploy/device/pack.sh's out/device, packed), gguf-*.whl, the
# model's parts part00, part01, ... (split -n N -d of the .gguf) and optionally tasks.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
stash=/tmp/kvstar-stash
mode=$1
shift
mkdir -p "$stash"
if [ "$mode" = stash ]; then
  for dir in "$@"; do cp -r "$dir"/. "$stash"/; done
  ls -la "$stash"
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 stash DIR... | run DIR [ARGS]"; exit 2; }
cp -r "$1"/. "$stash"/
shift
model_dir=/tmp/kvstar-model
mkdir -p "$model_dir"
cat "$stash"/part?? >"$model_dir/${KVSTAR_GGUF_NAME:-SmolLM2-135M-Instruct.Q4_1.gguf}"
sha256sum "$model_dir"/*.gguf
if [ -n "${KVSTAR_GGUF_SHA256:-}" ]; then
  echo "$KVSTAR_GGUF_SHA256  $(ls "$model_dir"/*.gguf)" | sha256sum -c -
fi
tar -C /tmp -xJf "$stash/device.tar.xz"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvstar-site "$stash"/*.whl
export PYTHONPATH=/tmp/kvstar-site LD_LIBRARY_PATH=/tmp/device/lib
export KVSTAR_LIB=/tmp/device/bin/libkvstar_client.so KVSTAR_SERVER=/tmp/device/bin/kvstar_server
export PYTHONUNBUFFERED=1
tasks=()
[ -f "$stash/tasks.json" ] && tasks=(--tasks_file "$stash/tasks.json")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 eval/accuracy.py --model "$model_dir" --device cuda "${tasks[@]}" \
  --results "${OUT:-/tmp}/accuracy.jsonl" "$@" 2>&1 | tr '\r' '\n' | tee "${OUT:-/tmp}/accuracy.log"
