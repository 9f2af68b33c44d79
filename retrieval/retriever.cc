#include "retrieval/retriever.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include "absl/strings/str_cat.h"

namespace kvstar::retrieval {

Retriever::Retriever(size_t num_threads) : pool_(num_threads), scratch_(pool_.num_threads()) {}

namespace {

// Who gathers a head's queries into the shared buffer: the first of its chunks to start. Chunks
// starting while it gathers gather their own copy (the same values) rather than wait.
enum GatherState : uint32_t { kNotGathered, kGathering, kGathered };

struct HeadWork {
  std::atomic<uint32_t> chunks_done{0};
  std::atomic<uint32_t> gather_state{kNotGathered};
};

// Per (request, layer): where its buffers are and how many heads are merged. Its region of the
// layer buffers is [heads][gathered] [heads][partials] [heads][head scores], each entry a
// multiple of 16 floats so every one starts 64-byte aligned.
struct LayerWork {
  uint32_t request = 0;
  uint32_t layer = 0;
  uint32_t num_blocks = 0;
  uint32_t num_heads = 0;
  uint32_t num_chunks = 0;
  size_t num_rows = 0;
  size_t gathered_floats = 0;  // per head: GatheredQueryFloats
  size_t partials_floats = 0;  // per head: HeadPartialsFloats
  size_t scores_floats = 0;    // per head: num_blocks
  float* region = nullptr;
  HeadWork* heads = nullptr;
  std::atomic<uint32_t> heads_done{0};

  size_t RegionFloats() const {
    return size_t{num_heads} *
           (Rounded(gathered_floats) + partials_floats + Rounded(scores_floats));
  }
  absl::Span<float> Gathered(uint32_t h) const {
    return absl::MakeSpan(region + h * Rounded(gathered_floats), gathered_floats);
  }
  absl::Span<float> Partials(uint32_t h) const {
    return absl::MakeSpan(region + num_heads * Rounded(gathered_floats) + h * partials_floats,
                          partials_floats);
  }
  absl::Span<float> HeadScores(uint32_t h) const {
    return absl::MakeSpan(region + num_heads * (Rounded(gathered_floats) + partials_floats) +
                              h * Rounded(scores_floats),
                          scores_floats);
  }
  static size_t Rounded(size_t floats) { return (floats + 15) / 16 * 16; }
};

}  // namespace

absl::Status Retriever::Retrieve(absl::Span<const RetrievalRequest> requests,
                                 const LayerCallback& on_layer,
                                 const CancelPredicate& is_cancelled) {
  return RetrieveWithScores(
      requests,
      [&on_layer](size_t request, uint32_t layer, absl::Span<const float>,
                  absl::Span<const uint32_t> selected) { on_layer(request, layer, selected); },
      is_cancelled);
}

absl::Status Retriever::RetrieveWithScores(absl::Span<const RetrievalRequest> requests,
                                           const LayerScoresCallback& on_layer,
                                           const CancelPredicate& is_cancelled) {
  // Validate everything first, so an error leaves no partial result behind.
  uint32_t max_layers = 0;
  size_t total_layers = 0, total_heads = 0;
  for (size_t r = 0; r < requests.size(); ++r) {
    const RetrievalRequest& request = requests[r];
    if (request.index == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("request ", r, " has no index"));
    }
    const ModelShape& shape = request.index->shape();
    if (request.layer_queries.size() != shape.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("request ", r, ": queries for ", request.layer_queries.size(),
                       " layers, expected num_layers = ", shape.num_layers));
    }
    for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
      absl::Status status =
          CheckScoreArgs(*request.index, layer, request.layer_queries[layer], request.num_queries);
      if (!status.ok()) {
        return absl::Status(status.code(), absl::StrCat("request ", r, ": ", status.message()));
      }
    }
    max_layers = std::max(max_layers, shape.num_layers);
    total_layers += shape.num_layers;
    total_heads += size_t{shape.num_layers} * shape.num_kv_heads;
  }

  absl::MutexLock retrieve_lock(&retrieve_mu_);
  // Per-call bookkeeping (a few allocations per call, none per task).
  std::unique_ptr<LayerWork[]> works(new LayerWork[total_layers]);
  std::unique_ptr<HeadWork[]> heads(new HeadWork[total_heads]);
  std::vector<size_t> first_work(requests.size());  // works index of (request, layer 0)
  size_t buffer_floats = 0;
  {
    size_t w = 0, head = 0;
    for (size_t r = 0; r < requests.size(); ++r) {
      const SequenceIndex& index = *requests[r].index;
      first_work[r] = w;
      for (uint32_t layer = 0; layer < index.shape().num_layers; ++layer, ++w) {
        LayerWork& work = works[w];
        work.request = static_cast<uint32_t>(r);
        work.layer = layer;
        work.num_blocks = index.num_blocks(layer);
        work.num_heads = index.shape().num_kv_heads;
        work.num_chunks = ChunksPerHead(work.num_blocks);
        work.num_rows = NumQueryRows(index, requests[r].num_queries);
        work.gathered_floats = GatheredQueryFloats(index, requests[r].num_queries);
        work.partials_floats = HeadPartialsFloats(work.num_blocks, work.num_rows, work.num_chunks);
        work.scores_floats = work.num_blocks;
        work.heads = &heads[head];
        head += work.num_heads;
        buffer_floats += work.RegionFloats();
      }
    }
  }
  float* buffer = layer_buffers_.Get(buffer_floats);
  for (size_t w = 0; w < total_layers; ++w) {
    works[w].region = buffer;
    buffer += works[w].RegionFloats();
  }
  // Tasks ordered layer-major so early layers finish (and stream) first; a head's chunks are
  // adjacent so it merges as soon as possible.
  std::vector<Task>& tasks = tasks_;
  tasks.clear();
  for (uint32_t layer = 0; layer < max_layers; ++layer) {
    for (size_t r = 0; r < requests.size(); ++r) {
      if (layer >= requests[r].index->shape().num_layers) continue;
      const uint32_t w = static_cast<uint32_t>(first_work[r] + layer);
      for (uint32_t h = 0; h < works[w].num_heads; ++h) {
        for (uint32_t chunk = 0; chunk < works[w].num_chunks; ++chunk) {
          tasks.push_back({w, h, chunk});
        }
      }
    }
  }

  std::atomic<bool> cancelled{false};
  pool_.ParallelFor(tasks.size(), [&](size_t t, size_t thread) {
    if (cancelled.load(std::memory_order_relaxed)) return;
    if (is_cancelled && is_cancelled()) {
      cancelled.store(true, std::memory_order_relaxed);
      return;
    }
    const Task& task = tasks[t];
    LayerWork& work = works[task.layer_work];
    const RetrievalRequest& request = requests[work.request];
    const SequenceIndex& index = *request.index;
    const absl::Span<const uint8_t> queries = request.layer_queries[work.layer];
    ThreadScratch& scratch = scratch_[thread];
    HeadWork& head = work.heads[task.kv_head];

    absl::Span<const float> gathered = work.Gathered(task.kv_head);
    uint32_t gather_state = head.gather_state.load(std::memory_order_acquire);
    if (gather_state == kNotGathered && head.gather_state.compare_exchange_strong(
                                            gather_state, kGathering, std::memory_order_acquire)) {
      GatherHeadQueries(index, work.layer, task.kv_head, queries, request.num_queries,
                        work.Gathered(task.kv_head));
      head.gather_state.store(kGathered, std::memory_order_release);
    } else if (gather_state != kGathered) {
      scratch.gathered.resize(work.gathered_floats);
      GatherHeadQueries(index, work.layer, task.kv_head, queries, request.num_queries,
                        absl::MakeSpan(scratch.gathered));
      gathered = scratch.gathered;
    }
    ScoreChunk(index, work.layer, task.kv_head, gathered, work.num_rows, task.chunk,
               work.num_chunks, work.Partials(task.kv_head), scratch.score);

    // The last chunk of a head merges it; the last head of a layer sums the heads in head order
    // (deterministic) and selects.
    if (head.chunks_done.fetch_add(1, std::memory_order_acq_rel) + 1 != work.num_chunks) return;
    MergeChunks(work.num_blocks, work.num_rows, work.num_chunks, work.Partials(task.kv_head),
                work.HeadScores(task.kv_head), scratch.score);
    if (work.heads_done.fetch_add(1, std::memory_order_acq_rel) + 1 != work.num_heads) return;
    const absl::Span<const float> first_head = work.HeadScores(0);
    std::vector<float>& block_scores = scratch.block_scores;
    block_scores.assign(first_head.begin(), first_head.end());
    for (uint32_t h = 1; h < work.num_heads; ++h) {
      const float* head_scores = work.HeadScores(h).data();
      for (uint32_t b = 0; b < work.num_blocks; ++b) block_scores[b] += head_scores[b];
    }
    SelectBlocksInto(block_scores, index.knobs(), scratch.select, scratch.selected);
    absl::MutexLock lock(&callback_mu_);
    on_layer(work.request, work.layer, block_scores, scratch.selected);
  });
  if (cancelled.load()) return absl::CancelledError("retrieval cancelled");
  return absl::OkStatus();
}

absl::Status Retriever::SealLayers(
    SequenceIndex& index, absl::Span<const uint32_t> layers,
    absl::Span<const std::vector<absl::Span<const uint8_t>>> key_blocks_per_layer) {
  const ModelShape& shape = index.shape();
  if (layers.size() != key_blocks_per_layer.size()) {
    return absl::InvalidArgumentError(absl::StrCat("key blocks for ", key_blocks_per_layer.size(),
                                                   " layers, expected ", layers.size()));
  }
  std::vector<bool> seen(shape.num_layers, false);
  for (size_t i = 0; i < layers.size(); ++i) {
    if (layers[i] >= shape.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layers[", i, "] = ", layers[i], ": must be below num_layers (", shape.num_layers, ")"));
    }
    if (seen[layers[i]]) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layers[i], " is listed twice"));
    }
    seen[layers[i]] = true;
    for (size_t b = 0; b < key_blocks_per_layer[i].size(); ++b) {
      if (key_blocks_per_layer[i][b].size() != shape.key_block_bytes()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "key block ", b, " of layer ", layers[i], " has ", key_blocks_per_layer[i][b].size(),
            " bytes, expected ", shape.key_block_bytes()));
      }
    }
  }
  // Layers share no state in SequenceIndex, so they seal concurrently.
  std::vector<absl::Status> statuses(layers.size());
  pool_.ParallelFor(layers.size(), [&](size_t i, size_t) {
    statuses[i] = index.SealLayer(layers[i], key_blocks_per_layer[i]);
  });
  for (const absl::Status& status : statuses) {
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace kvstar::retrieval
