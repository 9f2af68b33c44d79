#!/usr/bin/env bash
# Runs on the GPU test machine from the repository root, after deploy/device/pack.sh filled
# out/device here and it was carried there: the GPU tests, the transfer benchmark and the
# retrieval benchmark on the host's cores. Logs go to $OUT (or /tmp); a short table comes last.
#   deploy/device/run-gpu.sh [gpu|torch|transfer|retrieval ...]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp}"
export LD_LIBRARY_PATH="$PWD/out/device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=out/device/bin
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(gpu torch transfer retrieval)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "cores: $(nproc); $(lscpu | grep -m1 'Model name')"
summary=()
for part in "${parts[@]}"; do
  case "$part" in
    gpu)
      # Tests that start the real server find it the way Bazel lays out runfiles.
      export TEST_SRCDIR="$PWD/out/device/runfiles" TEST_WORKSPACE=kvstar
      TEST_TMPDIR="$(mktemp -d)" "$bin/gpu_test" --gtest_brief=0 2>&1 | tee "$out/gpu_test.log" | grep -E "^\[ *(OK|FAILED|SKIPPED|PASSED) *\]|Failure" 
      summary+=("gpu_test: $(grep -E '^\[  (PASSED|FAILED)  \]' "$out/gpu_test.log" | tr '\n' ' ')")
      # The client/server integration test as CI runs it (host backend), on this machine.
      TEST_TMPDIR="$(mktemp -d)" "$bin/client_server_test" 2>&1 | tee "$out/client_server_test.log" |
        grep -E "^\[ *(OK|FAILED|SKIPPED|PASSED) *\]|Failure|backend"
      summary+=("client_server_test: $(grep -E '^\[  (PASSED|FAILED)  \]' "$out/client_server_test.log" | tr '\n' ' ')")
      ;;
    torch)
      KVSTAR_LIB="$PWD/out/device/bin/libkvstar_client.so" PYTHONUNBUFFERED=1 \
        python3 deploy/device/torch_client_check.py 2>&1 | tee "$out/torch_client_check.log" | tail -8
      summary+=("torch_client_check: $(tail -1 "$out/torch_client_check.log")")
      ;;
    transfer)
      "$bin/transfer_bench" 2>&1 | tee "$out/transfer_bench.log" | tail -15
      summary+=("transfer_bench: $(tail -1 "$out/transfer_bench.log")")
      ;;
    retrieval)
      for args in "--model=qwen2.5-14b --context=32768" "--model=qwen2.5-14b --context=131072 --rpc_calls=0" \
                  "--model=llama3-8b --context=32768" "--model=smollm2-135m --context=32768"; do
        name="retrieval_bench_$(echo "$args" | tr -c 'a-z0-9.\n' '_' | cut -c1-60)"
        "$bin/retrieval_bench" $args --iters=10 2>&1 | grep -v '\[info\]' | tee "$out/$name.log" | tail -4
        summary+=("retrieval_bench $args: $(tail -1 "$out/$name.log")")
      done
      ;;
  esac
done
echo "==== summary"
printf '%s\n' "${summary[@]}"
