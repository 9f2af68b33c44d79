#!/usr/bin/env bash
# Builds kvstar's benchmarks and GPU tests with -c opt and copies them, with every shared library
# they need beyond the C runtime, into out/device/ — a folder that can be carried to a machine
# without Debian's packages (the GPU test machine) and run there with LD_LIBRARY_PATH=out/device/lib.
#   deploy/device/pack.sh [bazel targets...]
set -euo pipefail
cd "$(dirname "$0")/../.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(//bench:retrieval_bench //bench:transfer_bench
  //tests/client:gpu_test //bench:store_bench)
bazel build -c opt "${targets[@]}"
bin_dir=$(bazel info -c opt bazel-bin 2>/dev/null)
out=out/device
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for target in "${targets[@]}"; do
  path="${target#//}"
  path="${path/://}"
  cp -L "$bin_dir/$path" "$out/bin/"
done
# The C runtime and the GPU driver come from the target machine; everything else travels.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libgcc_s\.so|libstdc\+\+\.so|libcuda\.so)'
for binary in "$out"/bin/*; do
  ldd "$binary" | awk '/=> \// {print $1, $3}' | while read -r name file; do
    [[ "$name" =~ $skip ]] && continue
    [ -e "$out/lib/$name" ] || cp -L "$file" "$out/lib/$name"
  done
done
du -sh "$out"
ls "$out/bin"
