// Retrieve RPC service time over loopback: a real kvstar server (in this process, memory
// backend) holding one sequence, called the way a client library calls it every stride.
#ifndef KVSTAR_BENCH_RETRIEVE_RPC_H_
#define KVSTAR_BENCH_RETRIEVE_RPC_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "retrieval/model_shape.h"

namespace kvstar::bench {

struct RetrieveRpcResult {
  double put_s = 0;   // PutBlocks of the whole sequence
  double seal_s = 0;  // Seal RPC (representations of every layer + first selection)
  double p50_ms = 0;  // Retrieve of every layer, ids only, from call to final status
  double p99_ms = 0;
  uint32_t calls = 0;
};

// Stores block b of every layer with K = key_blocks[b] (V the same bytes), seals with `queries`
// (per layer, [num_queries][num_q_heads][head_dim]) and times `calls` Retrieve RPCs at
// increasing decode steps. `threads` scoring threads (0: all).
absl::StatusOr<RetrieveRpcResult> MeasureRetrieveRpc(
    const retrieval::ModelShape& shape, const retrieval::Knobs& knobs,
    absl::Span<const absl::Span<const uint8_t>> key_blocks,
    absl::Span<const std::vector<uint8_t>> queries, uint32_t num_queries, uint32_t calls,
    size_t threads);

}  // namespace kvstar::bench

#endif  // KVSTAR_BENCH_RETRIEVE_RPC_H_
