#!/usr/bin/env bash
# Builds Debian's own Abseil (the source package of the installed libabsl-dev, Debian's patches
# applied: same inline namespace `debian3`, same SONAMEs, same options.h) with gcc's
# -fsanitize=thread, as shared libraries under /opt/kvstar-tsan-absl.
# .bazelrc's --config=tsan links against it and puts it in the binaries' DT_RPATH, so the one
# Abseil in a test process, the one Debian's gRPC and Protobuf use too, tells TSan about every
# absl::Mutex lock and unlock. Without it TSan reports each access an absl::Mutex guards as a race.
#
# One patch on top of Debian's (third_party/tsan_absl/*.patch, each says why): TSan-only changes
# to Abseil's own annotations, none to what kvstar's accesses are checked against.
#
# Skips the build when the prefix already holds a build of the installed libabsl-dev version
# with the same patches.
# Needs root (or sudo) for apt: adds a deb-src entry mirroring the archive's deb entry when apt
# knows no source for abseil. Nothing comes from anywhere but Debian's archive.
# Prints the prefix on success.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
patches=("$repo"/third_party/tsan_absl/*.patch)
prefix=/opt/kvstar-tsan-absl  # .bazelrc's --config=tsan names this path
version=$(dpkg-query -W -f='${Version}' libabsl-dev)
build_id="$version $(cat "${patches[@]}" | sha256sum | cut -c1-16)"
stamp="$prefix/kvstar-tsan-absl.version"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$build_id" ]; then
  echo "build-tsan-abseil: $prefix already holds libabsl-dev $version (patched)" >&2
  echo "$prefix"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

tools=(cmake dpkg-dev)
bash "$repo/deploy/install-deps.sh" "${tools[@]}" >&2

# The deb-src entry: the deb entries of Debian's archive, with deb-src as their type.
if ! apt-cache showsrc abseil 2>/dev/null | grep -qx "Version: $version"; then
  src_list=/etc/apt/sources.list.d/kvstar-deb-src.sources
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] && [ "$f" != "$src_list" ] || continue
      grep -q '^URIs:.*debian' "$f" || continue
      sed 's/^Types: deb$/Types: deb-src/' "$f"
      echo
    done
  } | $SUDO tee "$src_list.tmp" >/dev/null
  if ! grep -q '^Types: deb-src' "$src_list.tmp" && [ -f /etc/apt/sources.list ]; then
    # One-line format: the same lines with deb-src.
    sed -n 's/^deb \(.*debian.*\)$/deb-src \1/p' /etc/apt/sources.list | $SUDO tee "$src_list.tmp" >/dev/null
    $SUDO mv "$src_list.tmp" /etc/apt/sources.list.d/kvstar-deb-src.list
  else
    $SUDO mv "$src_list.tmp" "$src_list"
  fi
  $SUDO apt-get update -q >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# Unsandboxed as root is expected (the _apt user cannot write here); apt says so on stderr.
apt-get source -q "abseil=$version" >&2
src=$(find . -maxdepth 1 -type d -name 'abseil-*' | head -1)
[ -n "$src" ] || { echo "build-tsan-abseil: apt-get source gave no abseil-* folder" >&2; exit 1; }
for p in "${patches[@]}"; do
  patch -d "$src" -p1 --forward --quiet <"$p" >&2
done

# Debian's configuration (debian/rules: C++17, shared) without NDEBUG, as Debian builds it;
# -O1 -g keeps TSan's stacks readable.
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=thread"
cmake -S "$src" -B build -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON \
  -DBUILD_TESTING=OFF -DABSL_ENABLE_INSTALL=ON -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=thread" >&2
cmake --build build -j "$(nproc)" >&2

# Same headers as the ones kvstar compiles against, or the ABI is not Debian's.
if ! cmp -s "$src/absl/base/options.h" /usr/include/absl/base/options.h; then
  echo "build-tsan-abseil: options.h differs from /usr/include/absl's; not installing" >&2
  exit 1
fi
$SUDO rm -rf "$prefix"
$SUDO cmake --install build >&2
echo "$build_id" | $SUDO tee "$stamp" >/dev/null
echo "build-tsan-abseil: built libabsl-dev $version with -fsanitize=thread into $prefix" >&2
echo "$prefix"
