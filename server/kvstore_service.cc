#include "server/kvstore_service.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <fstream>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/validation.h"
#include "spdlog/spdlog.h"

namespace kvstar::server {
namespace {

// Without --auth_tokens_file every caller is this tenant.
constexpr absl::string_view kDefaultTenant = "default";

// Stored sequences are keyed "<tenant>/<sequence_id>": tenants never see each other's ids.
std::string SequenceKey(absl::string_view tenant, absl::string_view sequence_id) {
  return absl::StrCat(tenant, "/", sequence_id);
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

v1::Block ToProto(storage::BlockData&& data) {
  v1::Block block;
  block.set_layer(data.id.layer);
  block.set_block_index(data.id.block_index);
  block.set_checksum(data.checksum);
  *block.mutable_key() = std::move(data.key);
  *block.mutable_value() = std::move(data.value);
  return block;
}

// Copies the block's bytes into the arena (K, then V) and describes them in `block`; false when
// there is no arena or no room, and the block must travel as bytes.
bool ToShared(const storage::BlockData& data, SharedMemoryArena* arena, v1::Block* block) {
  if (arena == nullptr) return false;
  std::optional<uint64_t> offset = arena->Allocate(data.size_bytes());
  if (!offset) return false;
  std::memcpy(arena->base() + *offset, data.key.data(), data.key.size());
  std::memcpy(arena->base() + *offset + data.key.size(), data.value.data(), data.value.size());
  block->set_layer(data.id.layer);
  block->set_block_index(data.id.block_index);
  block->set_checksum(data.checksum);
  v1::SharedMemoryRef* shared = block->mutable_shared();
  shared->set_segment(arena->name());
  shared->set_offset(*offset);
  shared->set_length(data.key.size());
  return true;
}

}  // namespace

KvStoreService::KvStoreService(storage::BlockStore* store, ServiceOptions options)
    : store_(store), options_(options), retriever_(options.retrieval_threads) {
  std::ifstream boot_id("/proc/sys/kernel/random/boot_id");
  std::getline(boot_id, host_id_);
}

absl::StatusOr<std::unique_ptr<KvStoreService>> KvStoreService::Create(storage::BlockStore* store,
                                                                       ServiceOptions options) {
  std::unique_ptr<KvStoreService> service(new KvStoreService(store, options));
  absl::StatusOr<std::vector<std::string>> keys = store->ListSequences();
  if (!keys.ok()) return keys.status();
  absl::MutexLock lock(&service->mu_);
  for (const std::string& key : *keys) {
    absl::StatusOr<std::string> metadata = store->GetSequence(key);
    if (!metadata.ok()) return metadata.status();
    v1::CreateSequenceRequest record;
    if (!record.ParseFromString(*metadata)) {
      return absl::DataLossError(absl::StrCat("metadata of sequence ", key, " does not parse"));
    }
    service->sequences_[key] = std::make_shared<Sequence>(key, record);
  }
  spdlog::info("loaded {} sequences from the store; {} retrieval threads", keys->size(),
               service->retriever_.num_threads());
  return service;
}

absl::StatusOr<std::string> KvStoreService::Tenant(const grpc::ServerContext* context) const {
  if (options_.auth == nullptr) return std::string(kDefaultTenant);
  const auto& metadata = context->client_metadata();
  auto found = metadata.find("authorization");
  return options_.auth->TenantOf(
      found == metadata.end() ? absl::string_view()
                              : absl::string_view(found->second.data(), found->second.size()));
}

absl::StatusOr<std::shared_ptr<KvStoreService::Sequence>> KvStoreService::Find(
    absl::string_view tenant, absl::string_view sequence_id) const {
  if (auto s = ValidateSequenceId(sequence_id); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(SequenceKey(tenant, sequence_id));
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence_id ", sequence_id, " is not stored"));
  }
  return it->second;
}

grpc::Status KvStoreService::CreateSequence(grpc::ServerContext* context,
                                            const v1::CreateSequenceRequest* request,
                                            v1::CreateSequenceResponse* response) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  if (auto s = ValidateSequenceId(request->sequence_id()); !s.ok()) return ToGrpc(s);
  absl::StatusOr<v1::ModelProfile> profile = NormalizeProfile(request->profile());
  if (!profile.ok()) return ToGrpc(profile.status());
  absl::StatusOr<v1::KvstarConfig> config = NormalizeConfig(request->config(), *profile);
  if (!config.ok()) return ToGrpc(config.status());

  const std::string key = SequenceKey(*tenant, request->sequence_id());
  *response->mutable_profile() = *profile;
  *response->mutable_config() = *config;

  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(key);
  if (it != sequences_.end()) {
    using google::protobuf::util::MessageDifferencer;
    const Sequence& stored = *it->second;
    if (!MessageDifferencer::Equals(stored.profile, *profile) ||
        !MessageDifferencer::Equals(stored.config, *config)) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          absl::StrCat("sequence_id ", request->sequence_id(),
                                       " exists with a different profile or config: stored {",
                                       stored.profile.ShortDebugString(), "} {",
                                       stored.config.ShortDebugString(), "}"));
    }
    response->set_created(false);
    return grpc::Status::OK;
  }
  v1::CreateSequenceRequest record;
  record.set_sequence_id(request->sequence_id());
  *record.mutable_profile() = *profile;
  *record.mutable_config() = *config;
  if (auto s = store_->PutSequence(key, record.SerializeAsString()); !s.ok()) return ToGrpc(s);
  sequences_[key] = std::make_shared<Sequence>(key, record);
  response->set_created(true);
  spdlog::info("created sequence {} ({})", request->sequence_id(), profile->ShortDebugString());
  return grpc::Status::OK;
}

namespace {

// Consecutive PutBlocks messages of one sequence are written to the store together, up to this
// many bytes: the store makes each write durable (an fsync), and one per 2 MiB message would
// bind a stream to the disk's sync rate rather than its bandwidth.
constexpr uint64_t kPutBatchBytes = 32 << 20;

}  // namespace

// Messages of one PutBlocks stream waiting to be written as one store batch. The writes point
// into `messages`, which a deque keeps at stable addresses.
struct KvStoreService::PendingPut {
  std::string key;
  std::deque<v1::PutBlocksRequest> messages;
  std::vector<storage::BlockWrite> writes;
  absl::flat_hash_set<storage::BlockId> ids;
  uint64_t bytes = 0;
  uint64_t first_message = 0;
};

absl::Status KvStoreService::CheckMessage(absl::string_view tenant,
                                          const v1::PutBlocksRequest& message) {
  absl::StatusOr<std::shared_ptr<Sequence>> sequence = Find(tenant, message.sequence_id());
  if (!sequence.ok()) return sequence.status();
  for (int i = 0; i < message.blocks_size(); ++i) {
    const v1::Block& block = message.blocks(i);
    const std::string where = absl::StrCat("blocks[", i, "]");
    if (auto s = ValidateBlock(block, (*sequence)->profile, where); !s.ok()) return s;
    if (storage::BlockChecksum(block.key(), block.value()) != block.checksum()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " (layer ", block.layer(), ", block ", block.block_index(),
                       "): checksum does not match its bytes (XXH3-64 of key then value)"));
    }
  }
  return absl::OkStatus();
}

absl::Status KvStoreService::FlushPut(PendingPut& pending, v1::PutBlocksResponse* response) {
  if (pending.writes.empty()) return absl::OkStatus();
  absl::Status stored = store_->PutBlocks(pending.key, pending.writes);
  if (stored.ok()) {
    response->set_blocks_written(response->blocks_written() + pending.writes.size());
    response->set_bytes_written(response->bytes_written() + pending.bytes);
    blocks_put_.fetch_add(pending.writes.size(), std::memory_order_relaxed);
  } else {
    stored = absl::Status(
        stored.code(),
        absl::StrCat("messages ", pending.first_message, "..",
                     pending.first_message + pending.messages.size() - 1, ": ", stored.message()));
  }
  pending.messages.clear();
  pending.writes.clear();
  pending.ids.clear();
  pending.bytes = 0;
  return stored;
}

grpc::Status KvStoreService::PutBlocks(grpc::ServerContext* context,
                                       grpc::ServerReader<v1::PutBlocksRequest>* reader,
                                       v1::PutBlocksResponse* response) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  PendingPut pending;
  uint64_t index = 0;
  auto fail = [&](const absl::Status& s) {
    spdlog::warn("PutBlocks rejected: {}", s.ToString());
    return ToGrpc(s);
  };
  for (v1::PutBlocksRequest message; reader->Read(&message); ++index) {
    if (absl::Status s = CheckMessage(*tenant, message); !s.ok()) {
      return fail(
          absl::Status(s.code(), absl::StrCat("PutBlocks message ", index, ": ", s.message())));
    }
    // A batch holds one sequence, each block at most once, and a bounded number of bytes.
    const std::string key = SequenceKey(*tenant, message.sequence_id());
    bool repeats = false;
    for (const v1::Block& block : message.blocks()) {
      repeats = repeats || pending.ids.contains({block.layer(), block.block_index()});
    }
    if (key != pending.key || repeats || pending.bytes >= kPutBatchBytes) {
      if (absl::Status s = FlushPut(pending, response); !s.ok()) return fail(s);
      pending.key = key;
      pending.first_message = index;
    }
    const v1::PutBlocksRequest& kept = pending.messages.emplace_back(std::move(message));
    for (const v1::Block& block : kept.blocks()) {
      if (!pending.ids.insert({block.layer(), block.block_index()}).second) {
        return fail(absl::InvalidArgumentError(
            absl::StrCat("PutBlocks message ", index, ": block (layer ", block.layer(), ", block ",
                         block.block_index(), ") appears twice in the message")));
      }
      pending.writes.push_back(storage::BlockWrite{
          {block.layer(), block.block_index()}, block.key(), block.value(), block.checksum()});
      pending.bytes += block.key().size() + block.value().size();
    }
  }
  if (absl::Status s = FlushPut(pending, response); !s.ok()) return fail(s);
  spdlog::debug("PutBlocks stored {} blocks ({} bytes) from {} messages",
                response->blocks_written(), response->bytes_written(), index);
  return grpc::Status::OK;
}

absl::StatusOr<retrieval::RetrievalRequest> KvStoreService::ToRetrievalRequest(
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

absl::Status KvStoreService::ForEachBlockBatch(
    const std::string& key, absl::Span<const storage::BlockId> ids, uint64_t block_bytes,
    const std::function<absl::Status(std::vector<storage::BlockData>&)>& consume) {
  const size_t per_batch =
      std::max<uint64_t>(1, options_.max_reply_bytes / std::max<uint64_t>(1, block_bytes));
  std::vector<storage::BlockData> batch;
  for (size_t begin = 0; begin < ids.size(); begin += per_batch) {
    const size_t count = std::min(per_batch, ids.size() - begin);
    if (auto s = store_->GetBlocks(key, ids.subspan(begin, count), &batch); !s.ok()) return s;
    if (auto s = consume(batch); !s.ok()) return s;
  }
  return absl::OkStatus();
}

grpc::Status KvStoreService::Seal(grpc::ServerContext* context, const v1::SealRequest* request,
                                  v1::SealResponse* response) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(*tenant, request->sequence_id());
  if (!found.ok()) return ToGrpc(found.status());
  Sequence& sequence = **found;
  const std::string& key = sequence.key;
  const uint32_t num_layers = sequence.profile.num_layers();
  // Checked before any block is read; the index is attached once it is built.
  absl::StatusOr<retrieval::RetrievalRequest> retrieval_request =
      ToRetrievalRequest(sequence, nullptr, request->queries(),
                         ToKnobs(sequence.config).max_seal_queries(), "request");
  if (!retrieval_request.ok()) return ToGrpc(retrieval_request.status());

  // Every layer must hold blocks 0..n-1, the same n: the prompt.
  absl::StatusOr<std::vector<storage::BlockId>> stored = store_->ListBlocks(key);
  if (!stored.ok()) return ToGrpc(stored.status());
  std::vector<std::vector<storage::BlockId>> by_layer(num_layers);
  for (const storage::BlockId& id : *stored) by_layer[id.layer].push_back(id);
  const size_t num_blocks = by_layer[0].size();
  for (uint32_t layer = 0; layer < num_layers; ++layer) {
    const auto& ids = by_layer[layer];
    const bool contiguous = !ids.empty() && ids.back().block_index == ids.size() - 1;
    if (ids.size() != num_blocks || !contiguous) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          absl::StrCat(
              "cannot seal sequence_id ", sequence.id, ": layer ", layer, " holds ", ids.size(),
              " blocks",
              ids.empty() ? "" : absl::StrCat(" (highest index ", ids.back().block_index, ")"),
              ", layer 0 holds ", num_blocks,
              "; every layer needs blocks 0..n-1 stored before Seal"));
    }
  }

  auto index =
      retrieval::SequenceIndex::Create(ToModelShape(sequence.profile), ToKnobs(sequence.config));
  if (!index.ok()) return ToGrpc(index.status());
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
      absl::Status read = ForEachBlockBatch(key, by_layer[layers[i]], block_bytes,
                                            [&](std::vector<storage::BlockData>& batch) {
                                              for (auto& block : batch) {
                                                keys[i].push_back(std::move(block.key));
                                              }
                                              return absl::OkStatus();
                                            });
      if (!read.ok()) return ToGrpc(read);
      for (const std::string& k : keys[i]) {
        spans[i].emplace_back(reinterpret_cast<const uint8_t*>(k.data()), k.size());
      }
    }
    if (auto s = retriever_.SealLayers(**index, layers, spans); !s.ok()) return ToGrpc(s);
  }

  retrieval_request->index = index->get();
  std::vector<std::vector<uint32_t>> selections(num_layers);
  absl::Status scored =
      retriever_.Retrieve(absl::MakeConstSpan(&*retrieval_request, 1),
                          [&](size_t, uint32_t layer, absl::Span<const uint32_t> selected) {
                            selections[layer].assign(selected.begin(), selected.end());
                          });
  if (!scored.ok()) return ToGrpc(scored);

  {
    absl::MutexLock lock(&sequence.mu);
    sequence.index = *std::move(index);
    sequence.last_decode_step = 0;
  }
  response->set_num_blocks(num_blocks);
  for (uint32_t layer = 0; layer < num_layers; ++layer) {
    v1::LayerSelection* selection = response->add_selections();
    selection->set_layer(layer);
    selection->mutable_block_indices()->Add(selections[layer].begin(), selections[layer].end());
  }
  blocks_scored_.fetch_add(uint64_t{num_blocks} * num_layers, std::memory_order_relaxed);
  spdlog::info("sealed sequence {}: {} layers x {} blocks", sequence.id, num_layers, num_blocks);
  return grpc::Status::OK;
}

absl::Status KvStoreService::CatchUp(const std::string& key, Sequence& sequence) {
  retrieval::SequenceIndex& index = *sequence.index;
  absl::StatusOr<std::vector<storage::BlockId>> stored = store_->ListBlocks(key);
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
  return ForEachBlockBatch(
      key, next, 2 * BlockKeyBytes(sequence.profile), [&](std::vector<storage::BlockData>& batch) {
        for (const storage::BlockData& block : batch) {
          auto span = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(block.key.data()),
                                          block.key.size());
          if (auto s = index.AppendBlock(block.id.layer, span); !s.ok()) {
            return s;
          }
        }
        return absl::OkStatus();
      });
}

namespace {

// A scored (request, layer), handed from the scoring threads to the thread writing replies.
struct ScoredLayer {
  size_t request;
  uint32_t layer;
  std::vector<uint32_t> selected;
};

}  // namespace

grpc::Status KvStoreService::Retrieve(grpc::ServerContext* context,
                                      const v1::RetrieveRequest* request,
                                      grpc::ServerWriter<v1::RetrieveResponse>* writer) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  if (request->sequences().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "sequences is empty");
  }
  const size_t n = request->sequences_size();
  std::vector<std::shared_ptr<Sequence>> sequences(n);
  absl::flat_hash_set<std::string> ids;
  for (size_t i = 0; i < n; ++i) {
    const v1::SequenceQueries& part = request->sequences(i);
    absl::StatusOr<std::shared_ptr<Sequence>> found = Find(*tenant, part.sequence_id());
    if (!found.ok()) {
      return ToGrpc(absl::Status(found.status().code(),
                                 absl::StrCat("sequences[", i, "]: ", found.status().message())));
    }
    if (!ids.insert(part.sequence_id()).second) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("sequences[", i, "]: sequence_id ", part.sequence_id(),
                                       " appears twice in one batch"));
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

  // Validate the whole batch before any state changes.
  std::vector<retrieval::RetrievalRequest> requests(n);
  std::vector<std::vector<absl::flat_hash_set<uint32_t>>> held(n);
  uint64_t blocks_scored = 0;
  for (size_t i = 0; i < n; ++i) {
    const v1::SequenceQueries& part = request->sequences(i);
    Sequence& sequence = *sequences[i];
    const std::string where = absl::StrCat("sequences[", i, "]");
    if (sequence.index == nullptr) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat(where, ": sequence_id ", sequence.id,
                                       " is not sealed (Seal it first; after a server restart, "
                                       "Seal it again)"));
    }
    if (part.decode_step() < sequence.last_decode_step) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat(where, ".decode_step is ", part.decode_step(),
                                       ", it went backwards from ", sequence.last_decode_step));
    }
    absl::StatusOr<retrieval::RetrievalRequest> r = ToRetrievalRequest(
        sequence, sequence.index.get(), part.queries(), sequence.config.retrieval_stride(), where);
    if (!r.ok()) return ToGrpc(r.status());
    requests[i] = *std::move(r);
    held[i].resize(sequence.profile.num_layers());
    for (int h = 0; h < part.held_size(); ++h) {
      const v1::HeldBlocks& layer_held = part.held(h);
      if (layer_held.layer() >= sequence.profile.num_layers()) {
        return grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            absl::StrCat(where, ".held[", h, "].layer is ", layer_held.layer(),
                         ", the sequence has ", sequence.profile.num_layers(), " layers"));
      }
      held[i][layer_held.layer()].insert(layer_held.block_indices().begin(),
                                         layer_held.block_indices().end());
    }
  }
  for (size_t i = 0; i < n; ++i) {
    Sequence& sequence = *sequences[i];
    if (auto s = CatchUp(sequence.key, sequence); !s.ok()) return ToGrpc(s);
    // The client asked again, so it is done with the previous reply's regions.
    FreeSharedRegions(sequence);
    sequence.last_decode_step = request->sequences(i).decode_step();
    for (uint32_t layer = 0; layer < sequence.profile.num_layers(); ++layer) {
      blocks_scored += sequence.index->num_blocks(layer);
    }
  }

  // Scoring threads hand each finished layer to this thread, which reads the new blocks and
  // writes the replies while later layers are still being scored.
  absl::Mutex queue_mu;
  absl::CondVar ready;
  std::deque<ScoredLayer> queue;
  bool scoring_done = false;
  std::atomic<bool> stop{false};
  absl::Status scored;
  std::thread scorer([&] {
    scored = retriever_.Retrieve(
        requests,
        [&](size_t r, uint32_t layer, absl::Span<const uint32_t> selected) {
          absl::MutexLock lock(&queue_mu);
          queue.push_back({r, layer, std::vector<uint32_t>(selected.begin(), selected.end())});
          ready.Signal();
        },
        // Only this RPC's own thread may ask gRPC whether the call was cancelled: for sync calls
        // IsCancelled plucks the call's completion queue, and concurrent plucks from the scoring
        // threads exhaust gRPC's pluckers and break the reply stream's writes.
        [&] { return stop.load(std::memory_order_relaxed); });
    absl::MutexLock lock(&queue_mu);
    scoring_done = true;
    ready.Signal();
  });

  absl::Status written;
  while (true) {
    ScoredLayer item;
    {
      absl::MutexLock lock(&queue_mu);
      while (queue.empty() && !scoring_done) {
        if (ready.WaitWithTimeout(&queue_mu, absl::Milliseconds(2)) && context->IsCancelled()) {
          stop.store(true);
        }
      }
      if (queue.empty()) break;
      item = std::move(queue.front());
      queue.pop_front();
    }
    if (!written.ok()) continue;  // drain
    Sequence& sequence = *sequences[item.request];
    sequence.mu.AssertHeld();
    written = WriteLayer(request->sequences(item.request), sequence, item.layer, item.selected,
                         held[item.request][item.layer], &sequence.shared_regions, writer);
    if (!written.ok()) {
      spdlog::warn("Retrieve: writing layer {} of sequence {} failed ({}); stopping the retrieval",
                   item.layer, sequence.id, written.ToString());
      stop.store(true);
    }
  }
  scorer.join();
  locks.clear();

  retrievals_.fetch_add(1, std::memory_order_relaxed);
  blocks_scored_.fetch_add(blocks_scored, std::memory_order_relaxed);
  if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  if (!written.ok()) return ToGrpc(written);
  return ToGrpc(scored);
}

absl::Status KvStoreService::WriteLayer(const v1::SequenceQueries& part, const Sequence& sequence,
                                        uint32_t layer, const std::vector<uint32_t>& selected,
                                        const absl::flat_hash_set<uint32_t>& held,
                                        std::vector<uint64_t>* shared_regions,
                                        grpc::ServerWriter<v1::RetrieveResponse>* writer) {
  v1::RetrieveResponse reply;
  reply.set_sequence_id(part.sequence_id());
  reply.set_decode_step(part.decode_step());
  reply.mutable_selection()->set_layer(layer);
  reply.mutable_selection()->mutable_block_indices()->Add(selected.begin(), selected.end());
  std::vector<storage::BlockId> wanted;
  if (part.include_data()) {
    for (uint32_t block : selected) {
      if (!held.contains(block)) wanted.push_back({layer, block});
    }
    blocks_skipped_held_.fetch_add(selected.size() - wanted.size(), std::memory_order_relaxed);
  }
  if (wanted.empty()) {
    if (!writer->Write(reply)) return absl::CancelledError("client went away");
    return absl::OkStatus();
  }
  size_t sent = 0;
  return ForEachBlockBatch(
      sequence.key, wanted, 2 * BlockKeyBytes(sequence.profile),
      [&](std::vector<storage::BlockData>& batch) {
        reply.clear_new_blocks();
        for (storage::BlockData& data : batch) {
          v1::Block* block = reply.add_new_blocks();
          if (part.shared_memory() && ToShared(data, options_.shared_memory, block)) {
            shared_regions->push_back(block->shared().offset());
            blocks_sent_shared_.fetch_add(1, std::memory_order_relaxed);
          } else {
            *block = ToProto(std::move(data));
          }
        }
        sent += batch.size();
        reply.set_more(sent < wanted.size());
        if (!writer->Write(reply)) return absl::CancelledError("client went away");
        blocks_sent_.fetch_add(batch.size(), std::memory_order_relaxed);
        return absl::OkStatus();
      });
}

grpc::Status KvStoreService::GetBlocks(grpc::ServerContext* context,
                                       const v1::GetBlocksRequest* request,
                                       grpc::ServerWriter<v1::GetBlocksResponse>* writer) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  absl::StatusOr<std::shared_ptr<Sequence>> sequence = Find(*tenant, request->sequence_id());
  if (!sequence.ok()) return ToGrpc(sequence.status());
  const v1::ModelProfile& profile = (*sequence)->profile;
  const std::string& key = (*sequence)->key;

  std::vector<storage::BlockId> ids;
  if (request->blocks().empty()) {
    absl::StatusOr<std::vector<storage::BlockId>> all = store_->ListBlocks(key);
    if (!all.ok()) return ToGrpc(all.status());
    ids = *std::move(all);
  } else {
    ids.reserve(request->blocks_size());
    for (int i = 0; i < request->blocks_size(); ++i) {
      const v1::BlockRef& ref = request->blocks(i);
      if (auto s = ValidateBlockRef(ref.layer(), ref.block_index(), profile,
                                    absl::StrCat("blocks[", i, "]"));
          !s.ok()) {
        return ToGrpc(s);
      }
      ids.push_back({ref.layer(), ref.block_index()});
    }
  }

  // Read and send in batches that fit one reply each, so memory stays bounded however many
  // blocks were asked for.
  absl::Status sent = ForEachBlockBatch(
      key, ids, 2 * BlockKeyBytes(profile), [&](std::vector<storage::BlockData>& batch) {
        if (context->IsCancelled()) return absl::CancelledError("cancelled");
        v1::GetBlocksResponse reply;
        reply.set_sequence_id(request->sequence_id());
        for (storage::BlockData& data : batch) *reply.add_blocks() = ToProto(std::move(data));
        if (!writer->Write(reply)) return absl::CancelledError("client went away");
        blocks_got_.fetch_add(batch.size(), std::memory_order_relaxed);
        return absl::OkStatus();
      });
  if (!sent.ok()) return ToGrpc(sent);
  return grpc::Status::OK;
}

grpc::Status KvStoreService::DropSequence(grpc::ServerContext* context,
                                          const v1::DropSequenceRequest* request,
                                          v1::DropSequenceResponse* response) {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return ToGrpc(tenant.status());
  if (auto s = ValidateSequenceId(request->sequence_id()); !s.ok()) return ToGrpc(s);
  const std::string key = SequenceKey(*tenant, request->sequence_id());
  std::shared_ptr<Sequence> sequence;
  absl::StatusOr<storage::DropResult> dropped;
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(key);
    if (it == sequences_.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("sequence_id ", request->sequence_id(), " is not stored"));
    }
    dropped = store_->DropSequence(key);
    if (!dropped.ok()) return ToGrpc(dropped.status());
    sequence = std::move(it->second);
    sequences_.erase(it);
  }
  // Outside the service lock: a retrieval of this sequence may still be streaming.
  {
    absl::MutexLock sequence_lock(&sequence->mu);
    FreeSharedRegions(*sequence);
  }
  response->set_blocks_dropped(dropped->blocks);
  response->set_bytes_dropped(dropped->bytes);
  spdlog::info("dropped sequence {} ({} blocks, {} bytes)", request->sequence_id(), dropped->blocks,
               dropped->bytes);
  return grpc::Status::OK;
}

grpc::Status KvStoreService::Stats(grpc::ServerContext* context, const v1::StatsRequest*,
                                   v1::StatsResponse* response) {
  // Any tenant may read the node's counters; callers without credentials may not.
  if (absl::StatusOr<std::string> tenant = Tenant(context); !tenant.ok()) {
    return ToGrpc(tenant.status());
  }
  {
    absl::MutexLock lock(&mu_);
    response->set_sequences(sequences_.size());
  }
  for (const storage::TierStats& tier : store_->Stats()) {
    v1::TierStats* out = response->add_tiers();
    out->set_name(tier.name);
    out->set_blocks(tier.blocks);
    out->set_bytes(tier.bytes);
    out->set_budget_bytes(tier.budget_bytes);
    out->set_hits(tier.hits);
    out->set_misses(tier.misses);
    out->set_evictions(tier.evictions);
    response->set_corrupt_blocks(response->corrupt_blocks() + tier.corrupt_blocks);
  }
  response->set_blocks_put(blocks_put_.load(std::memory_order_relaxed));
  response->set_blocks_got(blocks_got_.load(std::memory_order_relaxed));
  response->set_retrievals(retrievals_.load(std::memory_order_relaxed));
  response->set_blocks_scored(blocks_scored_.load(std::memory_order_relaxed));
  response->set_blocks_sent(blocks_sent_.load(std::memory_order_relaxed));
  response->set_blocks_skipped_held(blocks_skipped_held_.load(std::memory_order_relaxed));
  response->set_blocks_sent_shared(blocks_sent_shared_.load(std::memory_order_relaxed));
  return grpc::Status::OK;
}

grpc::Status KvStoreService::GetServerInfo(grpc::ServerContext* context,
                                           const v1::ServerInfoRequest*,
                                           v1::ServerInfoResponse* response) {
  if (absl::StatusOr<std::string> tenant = Tenant(context); !tenant.ok()) {
    return ToGrpc(tenant.status());
  }
  response->set_host_id(host_id_);
  response->set_api_version("kvstar.v1");
  if (options_.shared_memory != nullptr) {
    response->set_shared_memory_segment(options_.shared_memory->name());
    response->set_shared_memory_bytes(options_.shared_memory->size());
  }
  return grpc::Status::OK;
}

void KvStoreService::FreeSharedRegions(Sequence& sequence) {
  for (uint64_t offset : sequence.shared_regions) options_.shared_memory->Free(offset);
  sequence.shared_regions.clear();
}

}  // namespace kvstar::server
