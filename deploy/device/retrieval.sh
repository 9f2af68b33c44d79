#!/usr/bin/env bash
# Retrieval on the GPU machine's CPU: the retrieval tests (every scoring path against the scalar
# reference, the int8 accuracy guard on the real traces) and retrieval_bench at Qwen2.5-14B 32K,
# Llama-3-8B 32K and 128K, then a short table of every path and batch size. About 2-4 minutes on
# 16 cores. Pack first (on the build machine):
#   bash deploy/device/pack.sh //bench:retrieval_bench //tests/retrieval:convert_test \
#     //tests/retrieval:representation_test //tests/retrieval:topk_test \
#     //tests/retrieval:scorer_test //tests/retrieval:retriever_test //tests/retrieval:trace_test
# then, from the repository root there: bash deploy/device/retrieval.sh
# (KVSTAR_DEVICE_DIR overrides out/device; results and logs land in $OUT, else /tmp).
set -uo pipefail
cd "$(dirname "$0")/../.."
dev=${KVSTAR_DEVICE_DIR:-out/device}
results=${OUT:-/tmp}/retrieval
mkdir -p "$results"
export LD_LIBRARY_PATH="$dev/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nproc
grep -m1 'model name' /proc/cpuinfo
grep -o -m1 -w 'avx512_bf16\|amx_bf16\|amx_int8\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '
echo

failed=0
summary=()
for test in convert_test representation_test topk_test scorer_test retriever_test trace_test; do
  log="$results/$test.log"
  if [ ! -x "$dev/bin/$test" ]; then
    summary+=("$test: not packed")
    failed=1
    continue
  fi
  start=$(date +%s)
  # trace_test reads tests/data/ relative to the repository root when not under bazel.
  "$dev/bin/$test" >"$log" 2>&1
  rc=$?
  passed=$(grep -c '^\[       OK \]' "$log")
  skipped=$(grep -c '^\[  SKIPPED \]' "$log")
  status=ok
  [ $rc -eq 0 ] || { status=FAILED; failed=1; }
  summary+=("$test: $status, $passed passed, $skipped skipped, $(($(date +%s) - start)) s")
done
grep -h 'automatic paths\|SKIPPED\|largest |int8\|fast exp2' "$results"/scorer_test.log \
  "$results"/trace_test.log 2>/dev/null | sort -u

bench=()
run_bench() {
  local name=$1
  shift
  echo "== retrieval_bench $*"
  "$dev/bin/retrieval_bench" "$@" --rpc_calls=0 >"$results/bench_$name.txt" 2>"$results/bench_$name.err"
  local rc=$?
  grep -v '^{' "$results/bench_$name.txt"
  [ $rc -eq 0 ] || { echo "retrieval_bench $name failed (rc $rc)"; tail -5 "$results/bench_$name.err"; failed=1; }
  bench+=("$results/bench_$name.txt")
}
# Highway (the portable path) and the x86 paths that are candidates for the automatic choice;
# KVSTAR_BENCH_PATHS overrides (bench/retrieval_bench.cc lists every path).
paths=${KVSTAR_BENCH_PATHS:-highway,amx-bf16,int8-vnni,amx-int8}
run_bench qwen32k --model=qwen2.5-14b --context=32768 --iters=10 --batches=1,16,64 \
  --batch_memory_gb=4 --paths="$paths"
run_bench llama32k --model=llama3-8b --context=32768 --iters=10 --batches=1,16,64 \
  --batch_memory_gb=4 --paths="$paths"
run_bench llama128k --model=llama3-8b --context=131072 --iters=5 --batches=1,16 \
  --batch_memory_gb=8 --paths=amx-bf16,amx-int8

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
python3 - "${bench[@]}" <<'PY'
import json, sys
rows = []
for path in sys.argv[1:]:
    try:
        for line in open(path):
            if line.startswith("{"):
                rows.append(json.loads(line))
    except OSError:
        pass
print(f"{'model':12} {'ctx':>6} {'path':13} {'batch':>5} {'ms/retr':>8} {'retr/s':>7} "
      f"{'bytes-floor':>11} {'fma-floor':>9} {'GB/s':>6} {'vs GEMV':>8}")
for r in rows:
    print(f"{r['model']:12} {r['context']:>6} {r['path']:13} {r['batch']:>5} "
          f"{r['ms_per_retrieval']:8.2f} {r['retrievals_per_s']:7.1f} {r['bytes_floor_ms']:11.2f} "
          f"{r['fma_floor_ms']:9.2f} {r['membw_gbps']:6.1f} {r['speedup_vs_gemv']:7.1f}x")
# Issue 9's targets, per model and context: the fastest path in batches (the largest batch run).
targets = {("qwen2.5-14b", 32768): 4.0, ("llama3-8b", 32768): 2.5}
for (model, ctx), target in targets.items():
    runs = [r for r in rows if r["model"] == model and r["context"] == ctx]
    if not runs:
        continue
    batch = max(r["batch"] for r in runs)
    best = min((r for r in runs if r["batch"] == batch), key=lambda r: r["ms_per_retrieval"])
    ratio = best["ms_per_retrieval"] / best["bytes_floor_ms"]
    print(f"target {model} {ctx}: {best['ms_per_retrieval']:.2f} ms per retrieval "
          f"({best['path']}, batch {batch}, {ratio:.2f}x its bytes floor) vs <= {target} ms: "
          f"{'met' if best['ms_per_retrieval'] <= target else 'missed'}")
PY
exit $failed
