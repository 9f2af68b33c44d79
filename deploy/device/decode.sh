#!/usr/bin/env bash
# Runs bench/decode_bench.py on the GPU machine (torch, triton, no Debian packages, no network).
# The storage node and the client library travel packed: deploy/device/pack.sh's out/device as
# DIR/device.tar.xz in an ignored folder named in the device call's `carry`:
#   bash deploy/device/pack.sh //server:kvstar_server //client:libkvstar_client.so
#   mkdir -p .cache/device/d && tar -C out -cJf .cache/device/d/device.tar.xz device
#   deploy/device/decode.sh .cache/device/d [decode_bench.py ARGS]
# The log and the JSON rows land in $OUT (decode.log, decode.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$1
shift
tar -C /tmp -xJf "$dir/device.tar.xz"
export LD_LIBRARY_PATH=/tmp/device/lib
export KVSTAR_LIB=/tmp/device/bin/libkvstar_client.so KVSTAR_SERVER=/tmp/device/bin/kvstar_server
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
df -h /dev/shm | tail -1
grep -E 'MemTotal|MemAvailable' /proc/meminfo | tr -s ' ' | tr '\n' ' '
echo
python3 bench/decode_bench.py --results "$out/decode.jsonl" "$@" 2>&1 | tee -a "$out/decode.log"
