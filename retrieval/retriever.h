// Retrieval of all layers of a batch of sequences on a thread pool, streamed layer by layer.
#ifndef KVSTAR_RETRIEVAL_RETRIEVER_H_
#define KVSTAR_RETRIEVAL_RETRIEVER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "retrieval/model_shape.h"
#include "retrieval/representation.h"
#include "retrieval/scorer.h"
#include "retrieval/thread_pool.h"
#include "retrieval/topk.h"

namespace kvstar::retrieval {

// One sequence's part of a retrieval.
struct RetrievalRequest {
  const SequenceIndex* index = nullptr;  // every layer sealed; not modified during Retrieve
  uint32_t num_queries = 0;              // in [1, retrieval_stride]
  // Per layer (size num_layers): [num_queries][num_q_heads][head_dim] in the index's dtype.
  std::vector<absl::Span<const uint8_t>> layer_queries;
};

// Called once per (request, layer) as soon as that layer's selection is ready, with the selected
// block ids ascending. Calls are serialized (never two at once) but come from pool threads.
using LayerCallback =
    std::function<void(size_t request, uint32_t layer, absl::Span<const uint32_t> selected)>;

// As LayerCallback, with the layer's block scores (summed over KV heads) the selection came from.
using LayerScoresCallback =
    std::function<void(size_t request, uint32_t layer, absl::Span<const float> block_scores,
                       absl::Span<const uint32_t> selected)>;

// Returns true when the retrieval should stop; checked before every task (a chunk of the blocks
// of one (layer, KV head)).
using CancelPredicate = std::function<bool()>;

// Owns the scoring threads. Thread-safe: concurrent Retrieve calls run one after another, each
// using every thread.
class Retriever {
 public:
  // num_threads == 0: one per hardware thread.
  explicit Retriever(size_t num_threads = 0);

  size_t num_threads() const { return pool_.num_threads(); }

  // Tasks per thread a retrieval aims for: enough that the last tasks of a call (and of each
  // layer) are short next to the whole.
  static constexpr size_t kTasksPerThread = 64;

  // Scores every layer of every request and calls on_layer for each (request, layer), layers in
  // roughly increasing order. Each head's blocks are scored in ChunksPerHead(num_blocks) chunks
  // (split-K); a task scans one or more consecutive chunks of a head, as many tasks per head as
  // it takes to give every thread about kTasksPerThread tasks (one per head on few threads, so a
  // thread streams a head's blocks in order). The last task of a head merges it, the last head
  // of a layer sums the heads and selects. Scores and selections are bit-identical whatever the
  // number of threads (and equal ScoreLayer's). Returns
  // InvalidArgument / FailedPrecondition (checked before any work: bad queries, unsealed layers,
  // null index), or Cancelled if is_cancelled returned true (some layers may have been
  // delivered).
  absl::Status Retrieve(absl::Span<const RetrievalRequest> requests, const LayerCallback& on_layer,
                        const CancelPredicate& is_cancelled = nullptr);

  // As Retrieve, also passing each layer's block scores to the callback (tests, tools).
  absl::Status RetrieveWithScores(absl::Span<const RetrievalRequest> requests,
                                  const LayerScoresCallback& on_layer,
                                  const CancelPredicate& is_cancelled = nullptr);

  // Seals layers[i] of `index` from key_blocks_per_layer[i] (as SequenceIndex::SealLayer), the
  // layers in parallel on the pool; the result equals sealing them one by one. Checks everything
  // first: InvalidArgument (sizes differ, a layer out of range or repeated, a block of the wrong
  // size) leaves the index unchanged. REQUIRES: nothing else uses `index` during the call.
  // Runs after (or before) any concurrent Retrieve, not alongside it.
  absl::Status SealLayers(
      SequenceIndex& index, absl::Span<const uint32_t> layers,
      absl::Span<const std::vector<absl::Span<const uint8_t>>> key_blocks_per_layer);

 private:
  // Working memory of one pool thread, reused across tasks and calls.
  struct ThreadScratch {
    ScoreScratch score;
    std::vector<float> gathered;      // queries of a head when another thread gathers them
    std::vector<float> block_scores;  // a layer's sum over heads
    SelectScratch select;
    std::vector<uint32_t> selected;
  };
  // One task: consecutive chunks [first_chunk, end_chunk) of one (request, layer, KV head).
  struct Task {
    uint32_t layer_work;  // index into the call's per-(request, layer) work
    uint32_t kv_head;
    uint32_t first_chunk;
    uint32_t end_chunk;
  };

  ThreadPool pool_;
  std::vector<ThreadScratch> scratch_;  // one per pool thread
  absl::Mutex retrieve_mu_;             // serializes Retrieve calls: they share the buffers below
  // The open heads' gathered queries and chunk partials, and every layer's head scores; grows,
  // never shrinks, so steady-state calls touch no fresh pages.
  ScoreScratch layer_buffers_ ABSL_GUARDED_BY(retrieve_mu_);
  std::vector<Task> tasks_ ABSL_GUARDED_BY(retrieve_mu_);
  absl::Mutex callback_mu_;
};

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_RETRIEVER_H_
