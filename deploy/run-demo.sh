#!/usr/bin/env bash
# Sets up a fresh machine, starts a kvstar storage node with the embedded RocksDB backend, and
# shows it working: grpcurl (when it can be fetched) lists the API through server reflection and
# asks the health service; kvstar_demo, an engine's use of the client library, offloads a 4K-token
# sequence of a 28-layer model, seals it and decodes 24 steps, checking every resident slot's bytes;
# kvstarctl shows the node's health and stats. Stops the node at the end.
#   KVSTAR_DATA_DIR  where the node keeps its data (default: a fresh temp directory)
#   KVSTAR_KEEP=1    leave the node running (its address is printed)
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh
bazel build -c opt //server:kvstar_server //client:kvstar_demo //tools:kvstarctl
grpcurl=$(bash deploy/fetch-grpcurl.sh 2>/dev/null) || grpcurl=""

data_dir="${KVSTAR_DATA_DIR:-$(mktemp -d /tmp/kvstar-demo.XXXXXX)}"
port_file=$(mktemp /tmp/kvstar-port.XXXXXX)
rm -f "$port_file"
bazel-bin/server/kvstar_server --listen=127.0.0.1:0 --port_file="$port_file" \
  --data_dir="$data_dir" --backend=rocksdb &
pid=$!
if [ "${KVSTAR_KEEP:-0}" != 1 ]; then
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
fi
for _ in $(seq 1 600); do [ -s "$port_file" ] && break; sleep 0.05; done
[ -s "$port_file" ] || { echo "kvstar_server did not start" >&2; exit 1; }
addr="127.0.0.1:$(cat "$port_file")"
echo "== kvstar_server (pid $pid) serving on $addr, RocksDB in $data_dir"

if [ -n "$grpcurl" ]; then
  echo "== grpcurl -plaintext $addr list"
  "$grpcurl" -plaintext "$addr" list
  echo "== grpcurl -plaintext -d '{\"service\":\"kvstar.v1.KvStore\"}' $addr grpc.health.v1.Health/Check"
  "$grpcurl" -plaintext -d '{"service":"kvstar.v1.KvStore"}' "$addr" grpc.health.v1.Health/Check
fi

echo "== kvstar_demo --server=$addr"
bazel-bin/client/kvstar_demo --server="$addr"
echo "== kvstarctl --address=$addr health; kvstarctl stats"
bazel-bin/tools/kvstarctl --address="$addr" health
bazel-bin/tools/kvstarctl --address="$addr" stats
if [ "${KVSTAR_KEEP:-0}" = 1 ]; then
  echo "== kvstar_server left running on $addr (pid $pid)"
fi
