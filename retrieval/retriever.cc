#include "retrieval/retriever.h"

#include <atomic>

#include "absl/strings/str_cat.h"

namespace kvstar::retrieval {

Retriever::Retriever(size_t num_threads) : pool_(num_threads), scratch_(pool_.num_threads()) {}

namespace {

// Per (request, layer): head scores [num_kv_heads][num_blocks] and how many heads are done.
struct LayerWork {
  std::vector<float> head_scores;
  std::atomic<uint32_t> heads_done{0};
};

}  // namespace

absl::Status Retriever::Retrieve(absl::Span<const RetrievalRequest> requests,
                                 const LayerCallback& on_layer,
                                 const CancelPredicate& is_cancelled) {
  // Validate everything first, so an error leaves no partial result behind.
  uint32_t max_layers = 0;
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
  }

  // Tasks ordered layer-major so early layers finish (and stream) first.
  struct Task {
    uint32_t request;
    uint32_t layer;
    uint32_t kv_head;
  };
  std::vector<Task> tasks;
  std::vector<std::vector<LayerWork>> work(requests.size());
  for (size_t r = 0; r < requests.size(); ++r) {
    const SequenceIndex& index = *requests[r].index;
    work[r] = std::vector<LayerWork>(index.shape().num_layers);
    for (uint32_t layer = 0; layer < index.shape().num_layers; ++layer) {
      work[r][layer].head_scores.resize(size_t{index.shape().num_kv_heads} *
                                        index.num_blocks(layer));
    }
  }
  for (uint32_t layer = 0; layer < max_layers; ++layer) {
    for (size_t r = 0; r < requests.size(); ++r) {
      const ModelShape& shape = requests[r].index->shape();
      if (layer >= shape.num_layers) continue;
      for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
        tasks.push_back({static_cast<uint32_t>(r), layer, h});
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
    const RetrievalRequest& request = requests[task.request];
    const SequenceIndex& index = *request.index;
    const uint32_t num_blocks = index.num_blocks(task.layer);
    const uint32_t num_heads = index.shape().num_kv_heads;
    LayerWork& layer_work = work[task.request][task.layer];
    ScoreKvHead(index, task.layer, task.kv_head, request.layer_queries[task.layer],
                request.num_queries,
                absl::MakeSpan(layer_work.head_scores)
                    .subspan(size_t{task.kv_head} * num_blocks, num_blocks),
                scratch_[thread]);
    // The last head of a layer sums the heads in head order (deterministic) and selects.
    if (layer_work.heads_done.fetch_add(1, std::memory_order_acq_rel) + 1 != num_heads) return;
    std::vector<float> block_scores(layer_work.head_scores.begin(),
                                    layer_work.head_scores.begin() + num_blocks);
    for (uint32_t h = 1; h < num_heads; ++h) {
      const float* head = &layer_work.head_scores[size_t{h} * num_blocks];
      for (uint32_t b = 0; b < num_blocks; ++b) block_scores[b] += head[b];
    }
    const std::vector<uint32_t> selected = SelectBlocks(block_scores, index.knobs());
    absl::MutexLock lock(&callback_mu_);
    on_layer(task.request, task.layer, selected);
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
