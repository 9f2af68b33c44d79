#!/usr/bin/env bash
# Builds kvstar's libFuzzer targets with Debian's clang (-fsanitize=fuzzer,address,undefined)
# straight from the sources, outside Bazel (Bazel's toolchain is gcc; a clang one would rebuild
# everything in its own output base), and runs each for a bounded time from its seed corpus.
#   bash tests/fuzz/run.sh [SECONDS]          # default 60 s per target; exit 0 when none crashed
# KVSTAR_FUZZ_JUNIT=FILE also writes a junit xml there, one test case per target (tests/run.sh).
# KVSTAR_FUZZ_OUT picks the build/work folder (default: a fresh temporary one). A crash leaves
# its input in that folder (crash-*); add it to tests/fuzz/corpus/<target>/ once fixed.
set -uo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
clang=$(command -v clang++ || command -v clang++-14 || true)
[ -n "$clang" ] || { echo "fuzz: no clang++ (deploy/install-deps.sh installs clang)" >&2; exit 1; }
out=${KVSTAR_FUZZ_OUT:-$(mktemp -d)}
mkdir -p "$out/gen" "$out/obj"
junit=${KVSTAR_FUZZ_JUNIT:-/dev/null}
cases=""
finish() {
  echo "<testsuite>$cases</testsuite>" >"$junit"
  exit "$1"
}
build_failed() {
  echo "fuzz: $1" >&2
  cases+='<testcase name="fuzz_build"><failure/></testcase>'
  finish 1
}

/usr/bin/protoc -Iproto --cpp_out="$out/gen" proto/kvstar/v1/kvstar.proto ||
  build_failed "protoc failed"

flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined
       -fno-sanitize-recover=undefined -I. -I"$out/gen"
       -DSPDLOG_SHARED_LIB -DSPDLOG_COMPILED_LIB -DSPDLOG_FMT_EXTERNAL)
absl_libs=$(pkg-config --libs absl_status absl_statusor absl_strings absl_str_format absl_synchronization absl_hash absl_raw_hash_set absl_cord) ||
  build_failed "pkg-config knows no Abseil"

# Compiles each source once into $out/obj (two cores: two at a time).
compile() {
  local objects=() pids=() src obj
  for src in "$@"; do
    obj="$out/obj/$(echo "$src" | tr / _).o"
    objects+=("$obj")
    "$clang" "${flags[@]}" -c "$src" -o "$obj" &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || return 1; pids=("${pids[@]:1}"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || return 1; done
  printf '%s\n' "${objects[@]}"
}

storage_srcs=(storage/block_store.cc storage/checksum.cc storage/log_value.cc storage/posix_dir_store.cc
              storage/posix_io.cc storage/rocksdb_store.cc storage/store_util.cc)
build() {
  local target=$1 libs=$2; shift 2
  local objects
  objects=$(compile "$@") || { echo "fuzz: $target does not compile" >&2; return 1; }
  # shellcheck disable=SC2086
  "$clang" -fsanitize=fuzzer,address,undefined $objects -o "$out/$target" $libs -pthread
}

build validation_fuzzer "-lprotobuf $absl_libs" tests/fuzz/validation_fuzzer.cc \
  server/validation.cc retrieval/model_shape.cc "$out/gen/kvstar/v1/kvstar.pb.cc" ||
  build_failed "validation_fuzzer does not build"
build block_record_fuzzer "-lrocksdb -lspdlog -lfmt -lxxhash $absl_libs" \
  tests/fuzz/block_record_fuzzer.cc "${storage_srcs[@]}" ||
  build_failed "block_record_fuzzer does not build"

failed=0
for target in validation_fuzzer block_record_fuzzer; do
  work="$out/$target.corpus"  # new inputs go here, never into the committed seed corpus
  mkdir -p "$work"
  if (cd "$out" && TMPDIR="$out" ./"$target" -max_total_time="$seconds" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$work" \
        "$OLDPWD/tests/fuzz/corpus/$target") >"$out/$target.log" 2>&1; then
    echo "fuzz: $target: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$target.log" |
                           grep -o '[0-9]*$') runs in ${seconds} s, no crash"
    cases+="<testcase name=\"$target\"/>"
  else
    echo "fuzz: $target FAILED (log: $out/$target.log):"
    cases+="<testcase name=\"$target\"><failure/></testcase>"
    grep -E "ERROR|SUMMARY|runtime error|Test unit written|invariant|block_record_fuzzer:" \
      "$out/$target.log" | head -20
    failed=1
  fi
done
finish $failed
