#include "retrieval/retriever.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include "absl/strings/str_cat.h"

namespace kvstar::retrieval {

Retriever::Retriever(size_t num_threads) : pool_(num_threads), scratch_(pool_.num_threads()) {}

namespace {

constexpr uint32_t kNoSlot = ~0u;

// Who gathers a head's queries into its slot: the first of its chunks to start. Chunks starting
// while it gathers gather their own copy (the same values) rather than wait.
enum GatherState : uint32_t { kNotGathered, kGathering, kGathered };

struct HeadWork {
  std::atomic<uint32_t> slot{kNoSlot};
  std::atomic<uint32_t> chunks_done{0};
  std::atomic<uint32_t> gather_state{kNotGathered};
};

// Per (request, layer): sizes, its head scores and how many heads are merged.
struct LayerWork {
  uint32_t request = 0;
  uint32_t layer = 0;
  uint32_t num_blocks = 0;
  uint32_t num_heads = 0;
  uint32_t num_chunks = 0;
  size_t num_rows = 0;
  size_t gathered_floats = 0;    // per head: GatheredQueryFloats
  size_t partials_floats = 0;    // per head: HeadPartialsFloats
  float* head_scores = nullptr;  // [num_heads][num_blocks]
  HeadWork* heads = nullptr;
  std::atomic<uint32_t> heads_done{0};
};

size_t RoundedTo16(size_t floats) { return (floats + 15) / 16 * 16; }

// Working memory of the heads being scored: a head takes a slot (its gathered queries and chunk
// partials) when its first chunk starts and returns it after its merge, so slots are reused
// while still in cache. Open heads are at most threads + 1 (claimed chunks, plus the head whose
// chunks are being claimed), and each thread may hold one more slot for a moment while racing
// to open a head, hence 2 * threads + 2 slots.
class HeadSlots {
 public:
  HeadSlots(float* memory, size_t slot_floats, uint32_t num_slots)
      : memory_(memory), slot_floats_(slot_floats) {
    free_.reserve(num_slots);
    for (uint32_t s = num_slots; s > 0; --s) free_.push_back(s - 1);
  }
  float* Memory(uint32_t slot) const { return memory_ + slot * slot_floats_; }

  // The slot of `head`, taking a free one if it has none yet.
  uint32_t Open(HeadWork& head) {
    uint32_t slot = head.slot.load(std::memory_order_acquire);
    if (slot != kNoSlot) return slot;
    uint32_t mine;
    {
      absl::MutexLock lock(&mu_);
      mine = free_.back();  // never empty, see above
      free_.pop_back();
    }
    if (head.slot.compare_exchange_strong(slot, mine, std::memory_order_acq_rel)) return mine;
    Release(mine);
    return slot;
  }
  void Release(uint32_t slot) {
    absl::MutexLock lock(&mu_);
    free_.push_back(slot);
  }

 private:
  float* const memory_;
  const size_t slot_floats_;
  absl::Mutex mu_;
  std::vector<uint32_t> free_ ABSL_GUARDED_BY(mu_);  // most recently released last
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
  size_t scores_floats = 0, slot_floats = 0;
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
        work.heads = &heads[head];
        head += work.num_heads;
        scores_floats += size_t{work.num_heads} * work.num_blocks;
        slot_floats =
            std::max(slot_floats, RoundedTo16(work.gathered_floats) + work.partials_floats);
      }
    }
  }
  const uint32_t num_slots = 2 * static_cast<uint32_t>(pool_.num_threads()) + 2;
  float* buffer = layer_buffers_.Get(num_slots * slot_floats + scores_floats);
  HeadSlots slots(buffer, slot_floats, num_slots);
  buffer += num_slots * slot_floats;
  for (size_t w = 0; w < total_layers; ++w) {
    works[w].head_scores = buffer;
    buffer += size_t{works[w].num_heads} * works[w].num_blocks;
  }
  // Tasks ordered layer-major so early layers finish (and stream) first; a head's tasks are
  // adjacent so it merges as soon as possible.
  const size_t wanted_tasks_per_head =
      (kTasksPerThread * pool_.num_threads() + total_heads - 1) / std::max<size_t>(total_heads, 1);
  std::vector<Task>& tasks = tasks_;
  tasks.clear();
  for (uint32_t layer = 0; layer < max_layers; ++layer) {
    for (size_t r = 0; r < requests.size(); ++r) {
      if (layer >= requests[r].index->shape().num_layers) continue;
      const uint32_t w = static_cast<uint32_t>(first_work[r] + layer);
      const uint32_t num_chunks = works[w].num_chunks;
      const uint32_t tasks_per_head =
          static_cast<uint32_t>(std::min<size_t>(num_chunks, wanted_tasks_per_head));
      for (uint32_t h = 0; h < works[w].num_heads; ++h) {
        for (uint32_t i = 0; i < tasks_per_head; ++i) {
          tasks.push_back(
              {w, h, i * num_chunks / tasks_per_head, (i + 1) * num_chunks / tasks_per_head});
        }
      }
    }
  }

  std::atomic<bool> cancelled{false};
  // The workers read the tasks while this thread holds retrieve_mu_ inside ParallelFor; a view
  // taken here says so to the thread-safety analysis, which checks a lambda without the caller's
  // locks.
  const absl::Span<const Task> task_list = tasks;
  pool_.ParallelFor(task_list.size(), [&](size_t t, size_t thread) {
    if (cancelled.load(std::memory_order_relaxed)) return;
    if (is_cancelled && is_cancelled()) {
      cancelled.store(true, std::memory_order_relaxed);
      return;
    }
    const Task& task = task_list[t];
    LayerWork& work = works[task.layer_work];
    const RetrievalRequest& request = requests[work.request];
    const SequenceIndex& index = *request.index;
    const absl::Span<const uint8_t> queries = request.layer_queries[work.layer];
    ThreadScratch& scratch = scratch_[thread];
    HeadWork& head = work.heads[task.kv_head];
    const uint32_t slot = slots.Open(head);
    const absl::Span<float> slot_gathered =
        absl::MakeSpan(slots.Memory(slot), work.gathered_floats);
    const absl::Span<float> partials = absl::MakeSpan(
        slots.Memory(slot) + RoundedTo16(work.gathered_floats), work.partials_floats);

    absl::Span<const float> gathered = slot_gathered;
    uint32_t gather_state = head.gather_state.load(std::memory_order_acquire);
    if (gather_state == kNotGathered && head.gather_state.compare_exchange_strong(
                                            gather_state, kGathering, std::memory_order_acquire)) {
      GatherHeadQueries(index, work.layer, task.kv_head, queries, request.num_queries,
                        slot_gathered);
      head.gather_state.store(kGathered, std::memory_order_release);
    } else if (gather_state != kGathered) {
      scratch.gathered.resize(work.gathered_floats);
      GatherHeadQueries(index, work.layer, task.kv_head, queries, request.num_queries,
                        absl::MakeSpan(scratch.gathered));
      gathered = scratch.gathered;
    }
    for (uint32_t chunk = task.first_chunk; chunk < task.end_chunk; ++chunk) {
      ScoreChunk(index, work.layer, task.kv_head, gathered, work.num_rows, chunk, work.num_chunks,
                 partials, scratch.score);
    }

    // The last task of a head merges it; the last head of a layer sums the heads in head order
    // (deterministic) and selects.
    const uint32_t chunks = task.end_chunk - task.first_chunk;
    if (head.chunks_done.fetch_add(chunks, std::memory_order_acq_rel) + chunks != work.num_chunks) {
      return;
    }
    float* const all_head_scores = work.head_scores;
    MergeChunks(
        work.num_blocks, work.num_rows, work.num_chunks, partials,
        absl::MakeSpan(all_head_scores + size_t{task.kv_head} * work.num_blocks, work.num_blocks),
        scratch.score, index.knobs().block_vote);
    slots.Release(slot);
    if (work.heads_done.fetch_add(1, std::memory_order_acq_rel) + 1 != work.num_heads) return;
    std::vector<float>& block_scores = scratch.block_scores;
    block_scores.assign(all_head_scores, all_head_scores + work.num_blocks);
    for (uint32_t h = 1; h < work.num_heads; ++h) {
      const float* head_scores = all_head_scores + size_t{h} * work.num_blocks;
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
