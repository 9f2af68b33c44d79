#include "server/storage_node.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/validation.h"
#include "spdlog/spdlog.h"
#include "storage/log_value.h"

namespace kvstar::server {

std::string SequenceKey(absl::string_view tenant, absl::string_view sequence_id) {
  return absl::StrCat(tenant, "/", sequence_id);
}

namespace {

absl::Status Prefixed(const absl::Status& status, absl::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

absl::Status ReadBatch(storage::BlockStore& store, const std::string& key,
                       absl::Span<const storage::BlockId> ids,
                       std::vector<storage::BlockData>* out) {
  return store.GetBlocks(key, ids, out);
}

absl::Status ReadBatch(storage::BlockStore& store, const std::string& key,
                       absl::Span<const storage::BlockId> ids,
                       std::vector<storage::SharedBlockData>* out) {
  return store.ReadBlocks(key, ids, out);
}

// Reads `ids` in batches of at most `max_batch_bytes` (at least one block each) and hands each
// batch to `consume`. Block is storage::BlockData (owned copies, for replies that move the bytes
// on) or storage::SharedBlockData (the store's own copies where it keeps them in memory).
// Blocks of `block_bytes` in a batch of at most `max_batch_bytes`, at least one.
size_t BlocksPerBatch(uint64_t max_batch_bytes, uint64_t block_bytes) {
  return std::max<uint64_t>(1, max_batch_bytes / std::max<uint64_t>(1, block_bytes));
}

template <typename Block>
absl::Status ForEachBlockBatch(storage::BlockStore& store, uint64_t max_batch_bytes,
                               const std::string& key, absl::Span<const storage::BlockId> ids,
                               uint64_t block_bytes,
                               const std::function<absl::Status(std::vector<Block>&)>& consume) {
  const size_t per_batch = BlocksPerBatch(max_batch_bytes, block_bytes);
  std::vector<Block> batch;
  for (size_t begin = 0; begin < ids.size(); begin += per_batch) {
    const size_t count = std::min(per_batch, ids.size() - begin);
    if (auto s = ReadBatch(store, key, ids.subspan(begin, count), &batch); !s.ok()) return s;
    if (auto s = consume(batch); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

StorageNode::StorageNode(storage::BlockStore* store, NodeOptions options)
    : store_(store),
      options_(options),
      retriever_(options.retrieval_threads),
      copy_pool_(options.copy_threads) {}

absl::StatusOr<std::unique_ptr<StorageNode>> StorageNode::Create(storage::BlockStore* store,
                                                                 NodeOptions options) {
  std::unique_ptr<StorageNode> node(new StorageNode(store, options));
  absl::StatusOr<std::vector<std::string>> keys = store->ListSequences();
  if (!keys.ok()) return keys.status();
  for (const std::string& key : *keys) {
    absl::StatusOr<std::string> metadata = store->GetSequence(key);
    if (!metadata.ok()) return metadata.status();
    v1::CreateSequenceRequest record;
    if (!record.ParseFromString(*metadata)) {
      return absl::DataLossError(absl::StrCat("metadata of sequence ", key, " does not parse"));
    }
    // The key is "<tenant>/<sequence_id>" (SequenceKey).
    std::string tenant = key.substr(0, key.size() - record.sequence_id().size() - 1);
    Counters* counters = &node->TenantCounters(tenant);
    auto sequence = std::make_shared<Sequence>(std::move(tenant), record, counters);
    {
      absl::MutexLock lifecycle(&sequence->lifecycle_mu);
      sequence->state = Sequence::State::kLive;
    }
    sequence->live.store(true);
    absl::MutexLock lock(&node->mu_);
    node->sequences_[key] = std::move(sequence);
  }
  spdlog::info("event=loaded sequences={} retrieval_threads={}", keys->size(),
               node->retriever_.num_threads());
  return node;
}

absl::StatusOr<std::shared_ptr<StorageNode::Sequence>> StorageNode::Find(
    absl::string_view tenant, absl::string_view sequence_id) const {
  if (auto s = ValidateSequenceId(sequence_id); !s.ok()) return s;
  std::shared_ptr<Sequence> sequence;
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(SequenceKey(tenant, sequence_id));
    if (it != sequences_.end()) sequence = it->second;
  }
  if (sequence == nullptr || !sequence->live.load()) {
    return absl::NotFoundError(absl::StrCat("sequence_id ", sequence_id, " is not stored"));
  }
  return sequence;
}

absl::StatusOr<CreateResult> StorageNode::CreateSequence(absl::string_view tenant,
                                                         absl::string_view sequence_id,
                                                         const v1::ModelProfile& requested_profile,
                                                         const v1::KvstarConfig& requested_config) {
  if (auto s = ValidateSequenceId(sequence_id); !s.ok()) return s;
  absl::StatusOr<v1::ModelProfile> profile = NormalizeProfile(requested_profile);
  if (!profile.ok()) return profile.status();
  absl::StatusOr<v1::KvstarConfig> config = NormalizeConfig(requested_config, *profile);
  if (!config.ok()) return config.status();
  CreateResult result{*profile, *config, false};
  v1::CreateSequenceRequest record;
  record.set_sequence_id(std::string(sequence_id));
  *record.mutable_profile() = *profile;
  *record.mutable_config() = *config;
  const std::string key = SequenceKey(tenant, sequence_id);

  // A sequence being created or dropped by another call is waited for, then looked at again.
  while (true) {
    std::shared_ptr<Sequence> sequence;
    bool mine = false;
    {
      absl::MutexLock lock(&mu_);
      auto [it, inserted] = sequences_.try_emplace(key);
      if (inserted) {
        it->second =
            std::make_shared<Sequence>(std::string(tenant), record, &TenantCounters(tenant));
        mine = true;
      }
      sequence = it->second;
    }
    if (mine) {
      // The synced write happens under no lock but the new sequence's own state.
      absl::Status stored = store_->PutSequence(key, record.SerializeAsString());
      if (!stored.ok()) {
        {
          absl::MutexLock lock(&mu_);
          sequences_.erase(key);
        }
        absl::MutexLock lifecycle(&sequence->lifecycle_mu);
        sequence->state = Sequence::State::kGone;
        return stored;
      }
      {
        absl::MutexLock lifecycle(&sequence->lifecycle_mu);
        sequence->state = Sequence::State::kLive;
        sequence->live.store(true);
      }
      result.created = true;
      spdlog::info("event=created tenant={} sequence_id={} profile={}", storage::LogValue(tenant),
                   storage::LogValue(sequence_id), storage::LogValue(profile->ShortDebugString()));
      return result;
    }
    Sequence::State state;
    {
      absl::MutexLock lifecycle(&sequence->lifecycle_mu);
      sequence->lifecycle_mu.Await(absl::Condition(sequence.get(), &Sequence::Settled));
      state = sequence->state;
    }
    if (state == Sequence::State::kGone) continue;
    using google::protobuf::util::MessageDifferencer;
    if (!MessageDifferencer::Equals(sequence->profile, *profile) ||
        !MessageDifferencer::Equals(sequence->config, *config)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "sequence_id ", sequence_id, " exists with a different profile or config: stored {",
          sequence->profile.ShortDebugString(), "} {", sequence->config.ShortDebugString(), "}"));
    }
    return result;
  }
}

std::unique_ptr<PutStream> StorageNode::NewPutStream(absl::string_view tenant) {
  return std::unique_ptr<PutStream>(new PutStream(this, std::string(tenant)));
}

absl::Status StorageNode::CheckBlocks(const Sequence& sequence,
                                      absl::Span<const storage::BlockData> blocks) const {
  const uint64_t expected = BlockKeyBytes(sequence.profile);
  const v1::ModelProfile& profile = sequence.profile;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const storage::BlockData& block = blocks[i];
    const std::string where = absl::StrCat("blocks[", i, "]");
    if (auto s = ValidateBlockRef(block.id.layer, block.id.block_index, profile, where); !s.ok()) {
      return s;
    }
    if (block.key.size() != expected || block.value.size() != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, " (layer ", block.id.layer, ", block ", block.id.block_index, "): key is ",
          block.key.size(), " bytes and value ", block.value.size(), " bytes; the profile needs ",
          expected, " each (block_size ", profile.block_size(), " x num_kv_heads ",
          profile.num_kv_heads(), " x head_dim ", profile.head_dim(), " x ",
          DTypeBytes(profile.dtype()), " bytes)"));
    }
    if (storage::BlockChecksum(block.key, block.value) != block.checksum) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " (layer ", block.id.layer, ", block ", block.id.block_index,
                       "): checksum does not match its bytes (XXH3-64 of key then value)"));
    }
  }
  return absl::OkStatus();
}

absl::Status PutStream::Add(absl::string_view sequence_id, std::vector<storage::BlockData> blocks) {
  const uint64_t index = messages_++;
  const std::string prefix = absl::StrCat("PutBlocks message ", index, ": ");
  absl::StatusOr<std::shared_ptr<StorageNode::Sequence>> sequence =
      node_->Find(tenant_, sequence_id);
  if (!sequence.ok()) return Prefixed(sequence.status(), prefix);
  if (auto s = node_->CheckBlocks(**sequence, blocks); !s.ok()) return Prefixed(s, prefix);
  // A batch holds one sequence, each block at most once, and a bounded number of bytes.
  bool repeats = false;
  for (const storage::BlockData& block : blocks) repeats = repeats || ids_.contains(block.id);
  if ((*sequence)->key != key_ || repeats || bytes_ >= node_->options_.put_batch_bytes) {
    if (auto s = node_->FlushPut(*this); !s.ok()) return s;
    key_ = (*sequence)->key;
    first_message_ = index;
  }
  for (storage::BlockData& block : blocks) {
    if (!ids_.insert(block.id).second) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "block (layer ", block.id.layer,
                                                     ", block ", block.id.block_index,
                                                     ") appears twice in the message"));
    }
    bytes_ += block.size_bytes();
    queued_.push_back(std::move(block));
  }
  last_message_ = index;
  return absl::OkStatus();
}

absl::Status PutStream::Flush() { return node_->FlushPut(*this); }

absl::Status StorageNode::FlushPut(PutStream& stream) {
  if (stream.queued_.empty()) return absl::OkStatus();
  std::vector<storage::BlockWrite> writes;
  writes.reserve(stream.queued_.size());
  for (const storage::BlockData& block : stream.queued_) {
    writes.push_back(storage::BlockWrite{block.id, block.key, block.value, block.checksum});
  }
  absl::Status stored = store_->PutBlocks(stream.key_, writes);
  if (stored.ok() && options_.segment_resident_blocks && options_.shared_memory != nullptr) {
    // The key is "<tenant>/<sequence_id>" (SequenceKey).
    absl::StatusOr<std::shared_ptr<Sequence>> sequence =
        Find(stream.tenant_, absl::string_view(stream.key_).substr(stream.tenant_.size() + 1));
    if (sequence.ok()) KeepInSegment(**sequence, stream.queued_);
  }
  if (stored.ok()) {
    stream.blocks_written_ += writes.size();
    stream.bytes_written_ += stream.bytes_;
    Count(TenantCounters(stream.tenant_), &Counters::blocks_put, writes.size());
  } else {
    stored = Prefixed(
        stored, absl::StrCat("messages ", stream.first_message_, "..", stream.last_message_, ": "));
  }
  stream.queued_.clear();
  stream.ids_.clear();
  stream.bytes_ = 0;
  return stored;
}

void StorageNode::WriteRegions(
    SharedMemoryArena& arena,
    absl::Span<const std::pair<uint64_t, const storage::BlockData*>> regions) {
  std::vector<std::pair<char*, absl::string_view>> copies;  // to, from
  copies.reserve(2 * regions.size());
  for (const auto& [offset, block] : regions) {
    char* region = arena.base() + offset;
    copies.emplace_back(region, block->key);
    copies.emplace_back(region + block->key.size(), block->value);
  }
  copy_pool_.ParallelFor(copies.size(), [&](size_t i, size_t) {
    CopyToSegment(copies[i].first, copies[i].second.data(), copies[i].second.size());
  });
}

void StorageNode::KeepInSegment(Sequence& sequence, absl::Span<const storage::BlockData> blocks) {
  SharedMemoryArena* arena = options_.shared_memory->Find(sequence.tenant);
  if (arena == nullptr || blocks.empty()) return;
  // An eighth of the segment stays for the regions of blocks that are copied per reply.
  const uint64_t reserve = arena->size() / 8;
  std::vector<std::pair<storage::BlockId, Sequence::ResidentBlock>> kept;
  std::vector<std::pair<uint64_t, const storage::BlockData*>> regions;
  for (const storage::BlockData& block : blocks) {
    if (arena->free_bytes() < reserve + block.size_bytes()) break;
    std::optional<uint64_t> offset = arena->Allocate(block.size_bytes());
    if (!offset) break;
    regions.push_back({*offset, &block});
    kept.push_back({block.id, {*offset, block.checksum}});
  }
  // Every byte is written before any reply can name the region.
  WriteRegions(*arena, regions);
  std::vector<uint64_t> unused;
  {
    absl::MutexLock lock(&sequence.resident_mu);
    for (const auto& [id, region] : kept) {
      if (sequence.resident_closed) {
        unused.push_back(region.offset);  // dropped meanwhile
        continue;
      }
      auto [it, inserted] = sequence.resident.try_emplace(id, region);
      if (!inserted) {
        sequence.retired.push_back(it->second.offset);
        it->second = region;
      }
    }
  }
  if (!unused.empty()) arena->Free(unused, &copy_pool_);
}

absl::StatusOr<retrieval::RetrievalRequest> StorageNode::ToRetrievalRequest(
    const Sequence& sequence, const retrieval::SequenceIndex* index,
    const google::protobuf::RepeatedPtrField<v1::LayerQueries>& queries, uint32_t max_queries,
    absl::string_view where) const {
  const uint32_t num_layers = sequence.profile.num_layers();
  if (static_cast<uint32_t>(queries.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".queries has ", queries.size(),
                                                   " layers; the sequence has ", num_layers,
                                                   " and every layer needs its queries"));
  }
  retrieval::RetrievalRequest request;
  request.index = index;
  request.layer_queries.resize(num_layers);
  std::vector<bool> seen(num_layers, false);
  for (int i = 0; i < queries.size(); ++i) {
    const v1::LayerQueries& layer = queries[i];
    const std::string field = absl::StrCat(where, ".queries[", i, "]");
    if (auto s = ValidateLayerQueries(layer, sequence.profile, max_queries, field); !s.ok()) {
      return s;
    }
    if (seen[layer.layer()]) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".layer ", layer.layer(), " appears twice"));
    }
    if (i > 0 && layer.num_queries() != request.num_queries) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".num_queries is ", layer.num_queries(), ", layer ", queries[0].layer(), " has ",
          request.num_queries, "; all layers need the same count"));
    }
    seen[layer.layer()] = true;
    request.num_queries = layer.num_queries();
    request.layer_queries[layer.layer()] = absl::MakeConstSpan(
        reinterpret_cast<const uint8_t*>(layer.queries().data()), layer.queries().size());
  }
  return request;
}

absl::StatusOr<SealResult> StorageNode::Seal(absl::string_view tenant,
                                             const v1::SealRequest& request) {
  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(tenant, request.sequence_id());
  if (!found.ok()) return found.status();
  Sequence& sequence = **found;
  const std::string& key = sequence.key;
  const uint32_t num_layers = sequence.profile.num_layers();
  // Checked before any block is read; the index is attached once it is built.
  absl::StatusOr<retrieval::RetrievalRequest> retrieval_request = ToRetrievalRequest(
      sequence, nullptr, request.queries(), ToKnobs(sequence.config).max_seal_queries(), "request");
  if (!retrieval_request.ok()) return retrieval_request.status();

  // Every layer must hold blocks 0..n-1, the same n: the prompt.
  absl::StatusOr<std::vector<storage::BlockId>> stored = store_->ListBlocks(key);
  if (!stored.ok()) return stored.status();
  std::vector<std::vector<storage::BlockId>> by_layer(num_layers);
  for (const storage::BlockId& id : *stored) by_layer[id.layer].push_back(id);
  const size_t num_blocks = by_layer[0].size();
  for (uint32_t layer = 0; layer < num_layers; ++layer) {
    const auto& ids = by_layer[layer];
    const bool contiguous = !ids.empty() && ids.back().block_index == ids.size() - 1;
    if (ids.size() != num_blocks || !contiguous) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot seal sequence_id ", sequence.id, ": layer ", layer, " holds ", ids.size(),
          " blocks",
          ids.empty() ? "" : absl::StrCat(" (highest index ", ids.back().block_index, ")"),
          ", layer 0 holds ", num_blocks, "; every layer needs blocks 0..n-1 stored before Seal"));
    }
  }

  auto index =
      retrieval::SequenceIndex::Create(ToModelShape(sequence.profile), ToKnobs(sequence.config));
  if (!index.ok()) return index.status();
  // Layers are read a group at a time (one per scoring thread) and sealed in parallel, so the
  // K bytes held at once stay bounded whatever the sequence's length.
  const uint64_t block_bytes = 2 * BlockKeyBytes(sequence.profile);
  const uint32_t group = std::max<uint32_t>(1, retriever_.num_threads());
  for (uint32_t first = 0; first < num_layers; first += group) {
    std::vector<uint32_t> layers;
    for (uint32_t layer = first; layer < std::min(num_layers, first + group); ++layer) {
      layers.push_back(layer);
    }
    std::vector<std::vector<std::string>> keys(layers.size());
    std::vector<std::vector<absl::Span<const uint8_t>>> spans(layers.size());
    for (size_t i = 0; i < layers.size(); ++i) {
      keys[i].reserve(num_blocks);
      absl::Status read = ForEachBlockBatch<storage::BlockData>(
          *store_, options_.max_reply_bytes, key, by_layer[layers[i]], block_bytes,
          [&](std::vector<storage::BlockData>& batch) {
            for (auto& block : batch) keys[i].push_back(std::move(block.key));
            return absl::OkStatus();
          });
      if (!read.ok()) return read;
      for (const std::string& k : keys[i]) {
        spans[i].emplace_back(reinterpret_cast<const uint8_t*>(k.data()), k.size());
      }
    }
    if (auto s = retriever_.SealLayers(**index, layers, spans); !s.ok()) return s;
  }

  retrieval_request->index = index->get();
  SealResult result;
  result.num_blocks = static_cast<uint32_t>(num_blocks);
  result.selections.resize(num_layers);
  absl::Status scored =
      retriever_.Retrieve(absl::MakeConstSpan(&*retrieval_request, 1),
                          [&](size_t, uint32_t layer, absl::Span<const uint32_t> selected) {
                            result.selections[layer].assign(selected.begin(), selected.end());
                          });
  if (!scored.ok()) return scored;

  {
    absl::MutexLock lock(&sequence.mu);
    sequence.index = *std::move(index);
    sequence.last_decode_step = 0;
    sequence.sealed_blocks.store(static_cast<uint32_t>(num_blocks));
    sequence.sealed.store(true);
  }
  Count(*sequence.counters, &Counters::blocks_scored, uint64_t{num_blocks} * num_layers);
  spdlog::info("event=sealed sequence_id={} layers={} blocks={}", storage::LogValue(sequence.id),
               num_layers, num_blocks);
  return result;
}

absl::Status StorageNode::CatchUp(Sequence& sequence) {
  retrieval::SequenceIndex& index = *sequence.index;
  absl::StatusOr<std::vector<storage::BlockId>> stored = store_->ListBlocks(sequence.key);
  if (!stored.ok()) return stored.status();
  // Stored ids are sorted by (layer, index): per layer, take the run continuing the index.
  std::vector<uint32_t> want(sequence.profile.num_layers());
  for (uint32_t layer = 0; layer < want.size(); ++layer) want[layer] = index.num_blocks(layer);
  std::vector<storage::BlockId> next;
  for (const storage::BlockId& id : *stored) {
    if (id.block_index == want[id.layer]) {
      next.push_back(id);
      ++want[id.layer];
    }
  }
  if (next.empty()) return absl::OkStatus();
  return ForEachBlockBatch<storage::SharedBlockData>(
      *store_, options_.max_reply_bytes, sequence.key, next, 2 * BlockKeyBytes(sequence.profile),
      [&](std::vector<storage::SharedBlockData>& batch) {
        for (const storage::SharedBlockData& block : batch) {
          auto span = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(block->key.data()),
                                          block->key.size());
          if (auto s = index.AppendBlock(block->id.layer, span); !s.ok()) return s;
        }
        return absl::OkStatus();
      });
}

namespace {

// A scored (request, layer), handed from the scoring threads to the thread sending replies.
struct ScoredLayer {
  size_t request;
  uint32_t layer;
  std::vector<uint32_t> selected;
};

}  // namespace

absl::Status StorageNode::Retrieve(absl::string_view tenant, const v1::RetrieveRequest& request,
                                   const RetrieveSink& sink,
                                   const std::function<bool()>& cancelled) {
  if (request.sequences().empty()) return absl::InvalidArgumentError("sequences is empty");
  const size_t n = request.sequences_size();
  std::vector<std::shared_ptr<Sequence>> sequences(n);
  absl::flat_hash_set<std::string> ids;
  for (size_t i = 0; i < n; ++i) {
    const v1::SequenceQueries& part = request.sequences(i);
    absl::StatusOr<std::shared_ptr<Sequence>> found = Find(tenant, part.sequence_id());
    if (!found.ok()) return Prefixed(found.status(), absl::StrCat("sequences[", i, "]: "));
    if (!ids.insert(part.sequence_id()).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequences[", i, "]: sequence_id ", part.sequence_id(), " appears twice in one batch"));
    }
    sequences[i] = *std::move(found);
  }

  // Lock every sequence of the batch in one global order (by key), so two batches sharing
  // sequences cannot deadlock; hold the locks while their indexes are read.
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return sequences[a]->key < sequences[b]->key; });
  std::vector<std::unique_ptr<absl::MutexLock>> locks;
  for (size_t i : order) locks.push_back(std::make_unique<absl::MutexLock>(&sequences[i]->mu));
  const absl::Time locked = absl::Now();

  // Validate the whole batch before any state changes.
  std::vector<retrieval::RetrievalRequest> requests(n);
  std::vector<std::vector<absl::flat_hash_set<uint32_t>>> held(n);
  uint64_t blocks_scored = 0;
  for (size_t i = 0; i < n; ++i) {
    const v1::SequenceQueries& part = request.sequences(i);
    Sequence& sequence = *sequences[i];
    sequence.mu.AssertHeld();
    const std::string where = absl::StrCat("sequences[", i, "]");
    if (sequence.index == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, ": sequence_id ", sequence.id,
                       " is not sealed (Seal it first; after a server restart, Seal it again)"));
    }
    if (part.decode_step() < sequence.last_decode_step) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".decode_step is ", part.decode_step(),
                                                     ", it went backwards from ",
                                                     sequence.last_decode_step));
    }
    absl::StatusOr<retrieval::RetrievalRequest> r = ToRetrievalRequest(
        sequence, sequence.index.get(), part.queries(), sequence.config.retrieval_stride(), where);
    if (!r.ok()) return r.status();
    requests[i] = *std::move(r);
    held[i].resize(sequence.profile.num_layers());
    for (int h = 0; h < part.held_size(); ++h) {
      const v1::HeldBlocks& layer_held = part.held(h);
      if (layer_held.layer() >= sequence.profile.num_layers()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ".held[", h, "].layer is ",
                                                       layer_held.layer(), ", the sequence has ",
                                                       sequence.profile.num_layers(), " layers"));
      }
      held[i][layer_held.layer()].insert(layer_held.block_indices().begin(),
                                         layer_held.block_indices().end());
    }
  }
  for (size_t i = 0; i < n; ++i) {
    Sequence& sequence = *sequences[i];
    sequence.mu.AssertHeld();
    if (auto s = CatchUp(sequence); !s.ok()) return s;
    sequence.sealed_blocks.store(sequence.index->num_blocks(0));
    // The client asked again, so it is done with the previous reply's regions. They held this
    // live sequence's blocks, which its tenant may read anyway: released, not zeroed.
    FreeSharedRegions(sequence, /*zero=*/false);
    sequence.last_decode_step = request.sequences(i).decode_step();
    for (uint32_t layer = 0; layer < sequence.profile.num_layers(); ++layer) {
      blocks_scored += sequence.index->num_blocks(layer);
    }
  }

  // Scoring threads hand each finished layer to this thread, which reads the new blocks and
  // sends the replies while later layers are still being scored.
  absl::Mutex queue_mu;
  absl::CondVar ready;
  std::deque<ScoredLayer> queue;
  bool scoring_done = false;
  std::atomic<bool> stop{false};
  absl::Status scored;
  absl::Duration score_time;
  std::thread scorer([&] {
    const absl::Time start = absl::Now();
    scored = retriever_.Retrieve(
        requests,
        [&](size_t r, uint32_t layer, absl::Span<const uint32_t> selected) {
          absl::MutexLock lock(&queue_mu);
          queue.push_back({r, layer, std::vector<uint32_t>(selected.begin(), selected.end())});
          ready.Signal();
        },
        [&] { return stop.load(std::memory_order_relaxed); });
    score_time = absl::Now() - start;
    absl::MutexLock lock(&queue_mu);
    scoring_done = true;
    ready.Signal();
  });

  absl::Status sent;
  bool was_cancelled = false;
  SendTimes times;
  absl::Duration wait_time;
  while (true) {
    ScoredLayer item;
    {
      const absl::Time wait_start = absl::Now();
      absl::MutexLock lock(&queue_mu);
      while (queue.empty() && !scoring_done) {
        if (ready.WaitWithTimeout(&queue_mu, absl::Milliseconds(2)) && cancelled()) {
          was_cancelled = true;
          stop.store(true);
        }
      }
      wait_time += absl::Now() - wait_start;
      if (queue.empty()) break;
      item = std::move(queue.front());
      queue.pop_front();
    }
    if (!sent.ok()) continue;  // drain
    Sequence& sequence = *sequences[item.request];
    sequence.mu.AssertHeld();
    sent = SendLayer(request.sequences(item.request), item.request, sequence, item.layer,
                     item.selected, held[item.request][item.layer], sink, &times);
    if (!sent.ok()) {
      spdlog::warn("event=retrieve_send_failed sequence_id={} layer={} message={} action=stopped",
                   storage::LogValue(sequence.id), item.layer, storage::LogValue(sent.ToString()));
      stop.store(true);
    }
  }
  scorer.join();
  locks.clear();

  Counters& counters = TenantCounters(tenant);
  Count(counters, &Counters::retrievals, 1);
  Count(counters, &Counters::blocks_scored, blocks_scored);
  auto micros = [](absl::Duration d) {
    return static_cast<uint64_t>(absl::ToInt64Microseconds(d));
  };
  Count(counters, &Counters::retrieve_micros, micros(absl::Now() - locked));
  Count(counters, &Counters::retrieve_score_micros, micros(score_time));
  Count(counters, &Counters::retrieve_wait_micros, micros(wait_time));
  Count(counters, &Counters::retrieve_read_micros, micros(times.read));
  Count(counters, &Counters::retrieve_copy_micros, micros(times.copy));
  Count(counters, &Counters::retrieve_send_micros, micros(times.send));
  if (was_cancelled || cancelled()) return absl::CancelledError("cancelled");
  if (!sent.ok()) return sent;
  return scored;
}

absl::Status StorageNode::SendLayer(const v1::SequenceQueries& part, size_t request,
                                    Sequence& sequence, uint32_t layer,
                                    const std::vector<uint32_t>& selected,
                                    const absl::flat_hash_set<uint32_t>& held,
                                    const RetrieveSink& sink, SendTimes* times) {
  const absl::Time start = absl::Now();
  absl::Duration copy_and_send;  // the rest of this call is reading (and allocating regions)
  auto account = absl::MakeCleanup([&] { times->read += absl::Now() - start - copy_and_send; });
  RetrievedLayer reply;
  reply.request = request;
  reply.layer = layer;
  reply.selected = selected;
  std::vector<storage::BlockId> wanted;
  if (part.include_data()) {
    for (uint32_t block : selected) {
      if (!held.contains(block)) wanted.push_back({layer, block});
    }
    Count(*sequence.counters, &Counters::blocks_skipped_held, selected.size() - wanted.size());
  }
  auto timed_sink = [&] {
    const absl::Time send_start = absl::Now();
    const bool ok = sink(reply);
    const absl::Duration took = absl::Now() - send_start;
    times->send += took;
    copy_and_send += took;
    return ok;
  };
  if (wanted.empty()) {
    if (!timed_sink()) return absl::CancelledError("client went away");
    return absl::OkStatus();
  }
  size_t sent = 0;
  const uint64_t block_bytes = 2 * BlockKeyBytes(sequence.profile);
  auto send = [&](size_t count) {
    sent += count;
    reply.more = sent < wanted.size();
    if (!timed_sink()) return absl::CancelledError("client went away");
    Count(*sequence.counters, &Counters::blocks_sent, count);
    return absl::OkStatus();
  };
  // Only the caller's tenant's segment, and only once one of its clients holds it.
  SharedMemoryArena* arena = part.shared_memory() && options_.shared_memory != nullptr
                                 ? options_.shared_memory->Find(sequence.tenant)
                                 : nullptr;
  if (arena == nullptr) {
    return ForEachBlockBatch<storage::BlockData>(*store_, options_.max_reply_bytes, sequence.key,
                                                 wanted, block_bytes,
                                                 [&](std::vector<storage::BlockData>& batch) {
                                                   reply.blocks = std::move(batch);
                                                   return send(reply.blocks.size());
                                                 });
  }
  // The store's own copies are read without copying and go into the segment with one copy pass
  // per batch, spread over the copy threads. A reply that names regions carries no block bytes,
  // so a batch is a whole layer (up to kSharedBatchBytes): one reply, where each reply is a
  // round trip through gRPC's write path. Blocks the segment has no room for follow as bytes, in
  // replies of at most max_reply_bytes.
  reply.shared_segment = arena->id();
  // Blocks kept in the segment since they were put are named where they lie, in one reply.
  std::vector<storage::BlockId> to_copy;
  {
    absl::MutexLock lock(&sequence.resident_mu);
    for (const storage::BlockId& id : wanted) {
      auto kept = sequence.resident.find(id);
      if (kept == sequence.resident.end()) {
        to_copy.push_back(id);
      } else {
        reply.shared_blocks.push_back(
            SharedBlockRef{id, kept->second.checksum, kept->second.offset, block_bytes / 2});
      }
    }
  }
  if (!reply.shared_blocks.empty()) {
    Count(*sequence.counters, &Counters::blocks_sent_shared, reply.shared_blocks.size());
    if (auto s = send(reply.shared_blocks.size()); !s.ok()) return s;
    reply.shared_blocks.clear();
  }
  constexpr uint64_t kSharedBatchBytes = uint64_t{64} << 20;  // bounds what a disk store reads
  const size_t per_reply = BlocksPerBatch(options_.max_reply_bytes, block_bytes);
  return ForEachBlockBatch<storage::SharedBlockData>(
      *store_, std::max(kSharedBatchBytes, options_.max_reply_bytes), sequence.key, to_copy,
      block_bytes, [&](std::vector<storage::SharedBlockData>& batch) {
        sequence.mu.AssertHeld();
        reply.blocks.clear();
        reply.shared_blocks.clear();
        std::vector<const storage::SharedBlockData*> no_room;
        std::vector<std::pair<uint64_t, const storage::BlockData*>> regions;
        regions.reserve(batch.size());
        for (const storage::SharedBlockData& data : batch) {
          std::optional<uint64_t> offset = arena->Allocate(data->size_bytes());
          if (!offset) {
            no_room.push_back(&data);
            continue;
          }
          regions.push_back({*offset, data.get()});
          sequence.shared_regions.push_back(*offset);
          reply.shared_blocks.push_back(
              SharedBlockRef{data->id, data->checksum, *offset, data->key.size()});
        }
        const absl::Time copy_start = absl::Now();
        WriteRegions(*arena, regions);
        const absl::Duration copy_took = absl::Now() - copy_start;
        times->copy += copy_took;
        copy_and_send += copy_took;
        Count(*sequence.counters, &Counters::blocks_sent_shared, reply.shared_blocks.size());
        if (!reply.shared_blocks.empty()) {
          if (auto s = send(reply.shared_blocks.size()); !s.ok()) return s;
          reply.shared_blocks.clear();
        }
        for (size_t begin = 0; begin < no_room.size(); begin += per_reply) {
          reply.blocks.clear();
          for (size_t i = begin; i < std::min(no_room.size(), begin + per_reply); ++i) {
            reply.blocks.push_back(**no_room[i]);
          }
          if (auto s = send(reply.blocks.size()); !s.ok()) return s;
        }
        return absl::OkStatus();
      });
}

absl::Status StorageNode::GetBlocks(absl::string_view tenant, absl::string_view sequence_id,
                                    absl::Span<const storage::BlockId> ids, const BlockSink& sink) {
  absl::StatusOr<std::shared_ptr<Sequence>> sequence = Find(tenant, sequence_id);
  if (!sequence.ok()) return sequence.status();
  const v1::ModelProfile& profile = (*sequence)->profile;
  const std::string& key = (*sequence)->key;

  std::vector<storage::BlockId> all;
  if (ids.empty()) {
    absl::StatusOr<std::vector<storage::BlockId>> listed = store_->ListBlocks(key);
    if (!listed.ok()) return listed.status();
    all = *std::move(listed);
    ids = all;
  } else {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (auto s = ValidateBlockRef(ids[i].layer, ids[i].block_index, profile,
                                    absl::StrCat("blocks[", i, "]"));
          !s.ok()) {
        return s;
      }
    }
  }
  // Read and send in batches that fit one reply each, so memory stays bounded however many
  // blocks were asked for.
  return ForEachBlockBatch<storage::BlockData>(
      *store_, options_.max_reply_bytes, key, ids, 2 * BlockKeyBytes(profile),
      [&](std::vector<storage::BlockData>& batch) {
        const size_t count = batch.size();
        if (!sink(batch)) return absl::CancelledError("client went away");
        Count(*(*sequence)->counters, &Counters::blocks_got, count);
        return absl::OkStatus();
      });
}

absl::StatusOr<storage::DropResult> StorageNode::DropSequence(absl::string_view tenant,
                                                              absl::string_view sequence_id) {
  if (auto s = ValidateSequenceId(sequence_id); !s.ok()) return s;
  const std::string key = SequenceKey(tenant, sequence_id);
  auto not_found = [&] {
    return absl::NotFoundError(absl::StrCat("sequence_id ", sequence_id, " is not stored"));
  };
  std::shared_ptr<Sequence> sequence;
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(key);
    if (it == sequences_.end()) return not_found();
    sequence = it->second;
  }
  {
    absl::MutexLock lifecycle(&sequence->lifecycle_mu);
    if (sequence->state != Sequence::State::kLive) return not_found();
    // Dropping: new calls find it NOT_FOUND; a Create of the same id waits for the outcome.
    sequence->state = Sequence::State::kChanging;
    sequence->live.store(false);
  }
  // The store's drop (deletes, a synced write, files removed) runs under no node-wide lock.
  absl::StatusOr<storage::DropResult> dropped = store_->DropSequence(key);
  if (!dropped.ok()) {
    absl::MutexLock lifecycle(&sequence->lifecycle_mu);
    sequence->state = Sequence::State::kLive;
    sequence->live.store(true);
    return dropped.status();
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(key);
    if (it != sequences_.end() && it->second == sequence) sequences_.erase(it);
  }
  {
    absl::MutexLock lifecycle(&sequence->lifecycle_mu);
    sequence->state = Sequence::State::kGone;
  }
  // A retrieval of this sequence may still be sending; its lock waits for it.
  {
    absl::MutexLock sequence_lock(&sequence->mu);
    FreeSharedRegions(*sequence, /*zero=*/true);
  }
  spdlog::info("event=dropped tenant={} sequence_id={} blocks={} bytes={}",
               storage::LogValue(tenant), storage::LogValue(sequence_id), dropped->blocks,
               dropped->bytes);
  return dropped;
}

NodeStats StorageNode::Read(const Counters& counters) {
  NodeStats stats;
  stats.blocks_put = counters.blocks_put.load(std::memory_order_relaxed);
  stats.blocks_got = counters.blocks_got.load(std::memory_order_relaxed);
  stats.retrievals = counters.retrievals.load(std::memory_order_relaxed);
  stats.blocks_scored = counters.blocks_scored.load(std::memory_order_relaxed);
  stats.blocks_sent = counters.blocks_sent.load(std::memory_order_relaxed);
  stats.blocks_skipped_held = counters.blocks_skipped_held.load(std::memory_order_relaxed);
  stats.blocks_sent_shared = counters.blocks_sent_shared.load(std::memory_order_relaxed);
  stats.retrieve_micros = counters.retrieve_micros.load(std::memory_order_relaxed);
  stats.retrieve_score_micros = counters.retrieve_score_micros.load(std::memory_order_relaxed);
  stats.retrieve_wait_micros = counters.retrieve_wait_micros.load(std::memory_order_relaxed);
  stats.retrieve_read_micros = counters.retrieve_read_micros.load(std::memory_order_relaxed);
  stats.retrieve_copy_micros = counters.retrieve_copy_micros.load(std::memory_order_relaxed);
  stats.retrieve_send_micros = counters.retrieve_send_micros.load(std::memory_order_relaxed);
  return stats;
}

StorageNode::Counters& StorageNode::TenantCounters(absl::string_view tenant) {
  absl::MutexLock lock(&counters_mu_);
  std::unique_ptr<Counters>& slot = tenant_counters_[tenant];
  if (slot == nullptr) slot = std::make_unique<Counters>();
  return *slot;
}

void StorageNode::Count(Counters& tenant, std::atomic<uint64_t> Counters::*field, uint64_t n) {
  (node_counters_.*field).fetch_add(n, std::memory_order_relaxed);
  (tenant.*field).fetch_add(n, std::memory_order_relaxed);
}

NodeStats StorageNode::Stats() {
  NodeStats stats = Read(node_counters_);
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, sequence] : sequences_) stats.sequences += sequence->live.load();
  }
  stats.tiers = store_->Stats();
  return stats;
}

NodeStats StorageNode::TenantStats(absl::string_view tenant) {
  NodeStats stats;
  {
    absl::MutexLock lock(&counters_mu_);
    auto it = tenant_counters_.find(tenant);
    if (it != tenant_counters_.end()) stats = Read(*it->second);
  }
  absl::MutexLock lock(&mu_);
  for (const auto& [key, sequence] : sequences_) {
    stats.sequences += sequence->live.load() && sequence->tenant == tenant;
  }
  return stats;
}

SequenceInfo StorageNode::Describe(const Sequence& sequence) {
  SequenceInfo info;
  info.sequence_id = sequence.id;
  info.profile = sequence.profile;
  info.config = sequence.config;
  info.sealed = sequence.sealed.load();
  info.sealed_blocks = info.sealed ? sequence.sealed_blocks.load() : 0;
  return info;
}

std::vector<SequenceInfo> StorageNode::ListSequences(absl::string_view tenant) const {
  std::vector<std::shared_ptr<Sequence>> mine;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, sequence] : sequences_) {
      if (sequence->live.load() && sequence->tenant == tenant) {
        mine.push_back(sequence);
      }
    }
  }
  std::vector<SequenceInfo> infos;
  infos.reserve(mine.size());
  for (const std::shared_ptr<Sequence>& sequence : mine) infos.push_back(Describe(*sequence));
  std::sort(infos.begin(), infos.end(), [](const SequenceInfo& a, const SequenceInfo& b) {
    return a.sequence_id < b.sequence_id;
  });
  return infos;
}

absl::StatusOr<SequenceInfo> StorageNode::DescribeSequence(absl::string_view tenant,
                                                           absl::string_view sequence_id) {
  absl::StatusOr<std::shared_ptr<Sequence>> sequence = Find(tenant, sequence_id);
  if (!sequence.ok()) return sequence.status();
  SequenceInfo info = Describe(**sequence);
  absl::StatusOr<std::vector<storage::BlockId>> stored = store_->ListBlocks((*sequence)->key);
  if (!stored.ok()) return stored.status();
  info.blocks_per_layer.assign(info.profile.num_layers(), 0);
  for (const storage::BlockId& id : *stored) {
    if (id.layer < info.blocks_per_layer.size()) ++info.blocks_per_layer[id.layer];
  }
  info.bytes = stored->size() * 2 * BlockKeyBytes(info.profile);
  return info;
}

std::map<std::string, uint64_t> StorageNode::SequencesPerTenant() const {
  std::map<std::string, uint64_t> counts;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, sequence] : sequences_) {
    if (!sequence->live.load()) continue;
    ++counts[sequence->tenant];
  }
  return counts;
}

void StorageNode::FreeSharedRegions(Sequence& sequence, bool zero) {
  {
    // Retired regions of blocks put again go with the last reply's; Drop takes the kept ones too.
    absl::MutexLock lock(&sequence.resident_mu);
    sequence.shared_regions.insert(sequence.shared_regions.end(), sequence.retired.begin(),
                                   sequence.retired.end());
    sequence.retired.clear();
    if (zero) {
      sequence.resident_closed = true;
      for (const auto& [id, kept] : sequence.resident) {
        sequence.shared_regions.push_back(kept.offset);
      }
      sequence.resident.clear();
    }
  }
  if (!zero && sequence.shared_regions.empty()) return;  // nothing to release
  SharedMemoryArena* arena =
      options_.shared_memory != nullptr ? options_.shared_memory->Find(sequence.tenant) : nullptr;
  if (arena != nullptr) {
    if (zero) {
      arena->Free(sequence.shared_regions, &copy_pool_);
      // And what its earlier retrievals released that nobody has reused since.
      arena->ZeroReleased(sequence.segment_owner, &copy_pool_);
    } else {
      arena->Release(sequence.shared_regions, sequence.segment_owner);
    }
  }
  sequence.shared_regions.clear();
}

}  // namespace kvstar::server
