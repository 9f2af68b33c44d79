// Fused block scoring: one pass over a (layer, KV head) representation with an online softmax.
#ifndef KVSTAR_RETRIEVAL_SCORER_H_
#define KVSTAR_RETRIEVAL_SCORER_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "hwy/aligned_allocator.h"
#include "retrieval/representation.h"

namespace kvstar::retrieval {

// Reusable working memory of the scorer; one per thread. Not thread-safe.
class ScoreScratch {
 public:
  // Returns at least `floats` floats, 64-byte aligned; contents unspecified.
  float* Get(size_t floats);

 private:
  hwy::AlignedFreeUniquePtr<float[]> buffer_;
  size_t capacity_ = 0;
};

// Scores the blocks of (layer, kv_head) against the g query heads of kv_head:
// S = Q R^T / sqrt(head_dim) over all n*M representation vectors, softmax per query row,
// head_scores[b] = sum over rows and over block b's M vectors of the probabilities.
// `queries`: [num_queries][num_q_heads][head_dim] in the index's dtype.
// REQUIRES: the layer is sealed, queries has shape().query_bytes(num_queries) bytes,
// head_scores.size() == num_blocks(layer). Fused: each representation row is read once and
// dotted with every query row in registers; the score matrix is never materialised.
// Thread-safe for concurrent calls with distinct scratch.
void ScoreKvHead(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                 absl::Span<const uint8_t> queries, uint32_t num_queries,
                 absl::Span<float> head_scores, ScoreScratch& scratch);

// Checks what ScoreKvHead requires, for every head of `layer`: InvalidArgument (bad layer, query
// bytes, num_queries outside [1, retrieval_stride]) or FailedPrecondition (layer not sealed).
absl::Status CheckScoreArgs(const SequenceIndex& index, uint32_t layer,
                            absl::Span<const uint8_t> queries, uint32_t num_queries);

// Scores all blocks of one layer on the calling thread: the sum of ScoreKvHead over KV heads
// (in head order). block_scores is resized to num_blocks(layer).
absl::Status ScoreLayer(const SequenceIndex& index, uint32_t layer,
                        absl::Span<const uint8_t> queries, uint32_t num_queries,
                        std::vector<float>& block_scores);

// The Highway target the scorer dispatches to on this machine, e.g. "AVX3".
const char* DispatchedTargetName();

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_SCORER_H_
