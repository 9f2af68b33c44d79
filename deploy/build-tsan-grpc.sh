#!/usr/bin/env bash
# Builds Debian's own gRPC (the source package of the installed libgrpc++-dev, Debian's patches
# applied: same SONAMEs, same headers) with gcc's -fsanitize=thread, against the instrumented
# Abseil of deploy/build-tsan-abseil.sh, as shared libraries under /opt/kvstar-tsan-grpc: only the
# libraries a kvstar process loads (gpr, address_sorting, upb, grpc, grpc++, grpc++_reflection),
# no tests, plugins or other languages.
# .bazelrc's --config=tsan links against it and puts it in the binaries' DT_RPATH, so the one gRPC
# in a test process is instrumented: TSan then sees gRPC's hand-overs between threads (its
# completion queues, combiners and lock-free event engine use atomics that an uninstrumented
# library hides) and stops reporting every call's grpcpp templates, inlined into kvstar, as racing.
#
# Cost on CI's two cores: -O1 -g1 (line tables, enough for TSan's stacks) and a unity build
# (third_party/tsan_grpc/unity.cmake says which sources stay alone): 68 C++ translation units
# instead of 527, and 309 small C ones. Measured on the shared 2-core build machine: 4.5 minutes,
# apt-get source included.
#
# Skips the build when the prefix already holds a build of the installed libgrpc++-dev version,
# with this script, unity.cmake and the instrumented Abseil build it was compiled against.
# Needs root (or sudo) for apt and for the prefix. Nothing comes from anywhere but Debian's archive.
# Prints the prefix on success.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
unity="$repo/third_party/tsan_grpc/unity.cmake"
prefix=/opt/kvstar-tsan-grpc  # .bazelrc's --config=tsan names this path
absl_prefix=$(bash "$repo/deploy/build-tsan-abseil.sh")
version=$(dpkg-query -W -f='${Version}' libgrpc++-dev)
source_version=$(dpkg-query -W -f='${source:Version}' libgrpc++-dev)
build_id="$version $(cat "$0" "$unity" "$absl_prefix/kvstar-tsan-absl.version" | sha256sum | cut -c1-16)"
stamp="$prefix/kvstar-tsan-grpc.version"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$build_id" ]; then
  echo "build-tsan-grpc: $prefix already holds libgrpc++-dev $version" >&2
  echo "$prefix"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# gRPC's build dependencies that kvstar's own (deploy/install-deps.sh) do not bring. libprotoc-dev
# only satisfies CMake's configure step (the codegen targets name it); no plugin is built.
tools=(cmake ninja-build dpkg-dev libprotoc-dev libc-ares-dev libre2-dev libssl-dev zlib1g-dev
       protobuf-compiler-grpc)
bash "$repo/deploy/install-deps.sh" "${tools[@]}" >&2

# build-tsan-abseil.sh added the deb-src entry.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# Unsandboxed as root is expected (the _apt user cannot write here); apt says so on stderr.
apt-get source -q "grpc=$source_version" >&2
src=$(find . -maxdepth 1 -type d -name 'grpc-*' | head -1)
[ -n "$src" ] || { echo "build-tsan-grpc: apt-get source gave no grpc-* folder" >&2; exit 1; }

# grpc++_reflection's generated sources come from grpc_cpp_plugin, which CMake would build (with
# libprotoc); Debian's protobuf-compiler-grpc has the same plugin of the same version.
plugin_rule='set(_gRPC_CPP_PLUGIN $<TARGET_FILE:grpc_cpp_plugin>)'
grep -qF "$plugin_rule" "$src/CMakeLists.txt" || {
  echo "build-tsan-grpc: CMakeLists.txt no longer names grpc_cpp_plugin as expected" >&2
  exit 1
}
sed -i "s|set(_gRPC_CPP_PLUGIN \$<TARGET_FILE:grpc_cpp_plugin>)|set(_gRPC_CPP_PLUGIN /usr/bin/grpc_cpp_plugin)|" \
  "$src/CMakeLists.txt"

# Debian's configuration (debian/rules: packaged Abseil, c-ares, Protobuf, RE2, OpenSSL, zlib;
# shared, C++17) without its tests and plugins, against the instrumented Abseil, installing with an
# RPATH to both prefixes (DT_RPATH: used for the libraries' own dependencies too).
flags="-O1 -g1 -fno-omit-frame-pointer -fsanitize=thread"
cmake -S "$src" -B build -G Ninja -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_STANDARD=17 \
  -DBUILD_SHARED_LIBS=ON -DgRPC_BUILD_TESTS=OFF -DgRPC_BACKWARDS_COMPATIBILITY_MODE=OFF \
  -DgRPC_ABSL_PROVIDER=package -DgRPC_CARES_PROVIDER=package -DgRPC_PROTOBUF_PROVIDER=package \
  -DgRPC_RE2_PROVIDER=package -DgRPC_SSL_PROVIDER=package -DgRPC_ZLIB_PROVIDER=package \
  -DgRPC_BENCHMARK_PROVIDER=none -DgRPC_BUILD_CODEGEN=ON -DgRPC_BUILD_GRPC_CPP_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_CSHARP_PLUGIN=OFF -DgRPC_BUILD_GRPC_NODE_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_OBJECTIVE_C_PLUGIN=OFF -DgRPC_BUILD_GRPC_PHP_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_PYTHON_PLUGIN=OFF -DgRPC_BUILD_GRPC_RUBY_PLUGIN=OFF \
  -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=16 -DCMAKE_PROJECT_INCLUDE="$unity" \
  -DCMAKE_PREFIX_PATH="$absl_prefix" -DCMAKE_INSTALL_PREFIX="$prefix" -DgRPC_INSTALL_LIBDIR=lib \
  -DCMAKE_INSTALL_RPATH="$prefix/lib;$absl_prefix/lib" -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=thread -Wl,--disable-new-dtags" >&2
libraries=(gpr address_sorting upb grpc grpc++ grpc++_reflection)
cmake --build build -j "$(nproc)" --target "${libraries[@]}" >&2

# Only the libraries, not `cmake --install` (it would want every target built).
$SUDO rm -rf "$prefix"
$SUDO mkdir -p "$prefix/lib"
for lib in "${libraries[@]}"; do
  $SUDO cp -P build/lib"$lib".so* "$prefix/lib/"
done
# Same SONAMEs as Debian's, or the loader would not put these in their place.
for lib in "${libraries[@]}"; do
  soname=$(objdump -p "$prefix/lib/lib$lib.so" | awk '/SONAME/ {print $2}')
  [ -e "/usr/lib/$(gcc -print-multiarch)/$soname" ] || {
    echo "build-tsan-grpc: $soname is not one of Debian's libraries; not installing" >&2
    $SUDO rm -rf "$prefix"
    exit 1
  }
done
echo "$build_id" | $SUDO tee "$stamp" >/dev/null
echo "build-tsan-grpc: built libgrpc++-dev $version with -fsanitize=thread into $prefix" >&2
echo "$prefix"
