#!/usr/bin/env bash
# Installs every Debian package kvstar's build, tests and benchmarks need. Idempotent.
# Nothing comes from anywhere but Debian's archive.
#   deploy/install-deps.sh            kvstar's packages
#   deploy/install-deps.sh PKG...     just these (the TSan builds' tools: build-tsan-*.sh)
set -euo pipefail

packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(
  bazel-bootstrap default-jdk-headless build-essential pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libabsl-dev librocksdb-dev libhwy-dev libspdlog-dev libfmt-dev libxxhash-dev
  libgtest-dev libgmock-dev libbenchmark-dev python3 clang-format clang openssl
  libcpp-httplib-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
