#!/usr/bin/env bash
# Builds kvstar's benchmarks and GPU tests with -c opt and copies them, with every shared library
# they need beyond the C runtime, into out/device/ — a folder that can be carried to a machine
# without Debian's packages (the GPU test machine) and run there with LD_LIBRARY_PATH=out/device/lib.
#   deploy/device/pack.sh [bazel targets...]
set -euo pipefail
cd "$(dirname "$0")/../.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(//bench:retrieval_bench //bench:transfer_bench
  //tests/client:gpu_test //tests/client:client_server_test //server:kvstar_server
  //client:libkvstar_client.so)
# Static linking of the project's own libraries: test binaries otherwise load them from runfiles.
bazel build -c opt --dynamic_mode=off "${targets[@]}"
bin_dir=$(bazel info -c opt --dynamic_mode=off bazel-bin 2>/dev/null)
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
# Tests that start the real server find it the way Bazel lays out runfiles.
mkdir -p "$out/runfiles/kvstar/server"
ln -sf ../../../bin/kvstar_server "$out/runfiles/kvstar/server/kvstar_server"
du -sh "$out"
ls "$out/bin"
