#include "server/kvstore_service.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/validation.h"
#include "spdlog/spdlog.h"

namespace kvstar::server {
namespace {

// Until credentials map callers to tenants, every caller is this tenant. Keys are scoped now so
// stored data keeps its layout when tenants arrive.
constexpr absl::string_view kDefaultTenant = "default";

std::string SequenceKey(absl::string_view sequence_id) {
  return absl::StrCat(kDefaultTenant, "/", sequence_id);
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
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

}  // namespace

absl::StatusOr<std::unique_ptr<KvStoreService>> KvStoreService::Create(
    storage::BlockStore* store, ServiceOptions options) {
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
    service->sequences_[key] = Sequence{record.profile(), record.config()};
  }
  spdlog::info("loaded {} sequences from the store", keys->size());
  return service;
}

absl::StatusOr<KvStoreService::Sequence> KvStoreService::Find(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(key);
  if (it == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrCat("sequence_id ", key.substr(kDefaultTenant.size() + 1), " is not stored"));
  }
  return it->second;
}

grpc::Status KvStoreService::CreateSequence(grpc::ServerContext*,
                                            const v1::CreateSequenceRequest* request,
                                            v1::CreateSequenceResponse* response) {
  if (auto s = ValidateSequenceId(request->sequence_id()); !s.ok()) return ToGrpc(s);
  absl::StatusOr<v1::ModelProfile> profile = NormalizeProfile(request->profile());
  if (!profile.ok()) return ToGrpc(profile.status());
  absl::StatusOr<v1::KvstarConfig> config = NormalizeConfig(request->config(), *profile);
  if (!config.ok()) return ToGrpc(config.status());

  const std::string key = SequenceKey(request->sequence_id());
  *response->mutable_profile() = *profile;
  *response->mutable_config() = *config;

  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(key);
  if (it != sequences_.end()) {
    using google::protobuf::util::MessageDifferencer;
    if (!MessageDifferencer::Equals(it->second.profile, *profile) ||
        !MessageDifferencer::Equals(it->second.config, *config)) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          absl::StrCat("sequence_id ", request->sequence_id(),
                                       " exists with a different profile or config: stored {",
                                       it->second.profile.ShortDebugString(), "} {",
                                       it->second.config.ShortDebugString(), "}"));
    }
    response->set_created(false);
    return grpc::Status::OK;
  }
  v1::CreateSequenceRequest record;
  record.set_sequence_id(request->sequence_id());
  *record.mutable_profile() = *profile;
  *record.mutable_config() = *config;
  if (auto s = store_->PutSequence(key, record.SerializeAsString()); !s.ok()) return ToGrpc(s);
  sequences_[key] = Sequence{*profile, *config};
  response->set_created(true);
  spdlog::info("created sequence {} ({})", request->sequence_id(), profile->ShortDebugString());
  return grpc::Status::OK;
}

absl::Status KvStoreService::PutMessage(const v1::PutBlocksRequest& message,
                                        v1::PutBlocksResponse* response) {
  if (auto s = ValidateSequenceId(message.sequence_id()); !s.ok()) return s;
  const std::string key = SequenceKey(message.sequence_id());
  absl::StatusOr<Sequence> sequence = Find(key);
  if (!sequence.ok()) return sequence.status();

  std::vector<storage::BlockWrite> writes;
  writes.reserve(message.blocks_size());
  uint64_t bytes = 0;
  for (int i = 0; i < message.blocks_size(); ++i) {
    const v1::Block& block = message.blocks(i);
    if (auto s = ValidateBlock(block, sequence->profile, absl::StrCat("blocks[", i, "]"));
        !s.ok()) {
      return s;
    }
    writes.push_back(storage::BlockWrite{{block.layer(), block.block_index()},
                                         block.key(),
                                         block.value(),
                                         block.checksum()});
    bytes += block.key().size() + block.value().size();
  }
  if (writes.empty()) return absl::OkStatus();
  if (auto s = store_->PutBlocks(key, writes); !s.ok()) return s;
  response->set_blocks_written(response->blocks_written() + writes.size());
  response->set_bytes_written(response->bytes_written() + bytes);
  blocks_put_.fetch_add(writes.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

grpc::Status KvStoreService::PutBlocks(grpc::ServerContext*,
                                       grpc::ServerReader<v1::PutBlocksRequest>* reader,
                                       v1::PutBlocksResponse* response) {
  v1::PutBlocksRequest message;
  uint64_t messages = 0;
  while (reader->Read(&message)) {
    absl::Status s = PutMessage(message, response);
    if (!s.ok()) {
      spdlog::warn("PutBlocks message {} rejected: {}", messages, s.ToString());
      return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                          absl::StrCat("PutBlocks message ", messages, ": ", s.message()));
    }
    ++messages;
  }
  spdlog::debug("PutBlocks stored {} blocks ({} bytes) from {} messages",
                response->blocks_written(), response->bytes_written(), messages);
  return grpc::Status::OK;
}

grpc::Status KvStoreService::Seal(grpc::ServerContext*, const v1::SealRequest*,
                                  v1::SealResponse*) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      "Seal is not implemented by this server build");
}

grpc::Status KvStoreService::Retrieve(grpc::ServerContext*, const v1::RetrieveRequest*,
                                      grpc::ServerWriter<v1::RetrieveResponse>*) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      "Retrieve is not implemented by this server build");
}

grpc::Status KvStoreService::GetBlocks(grpc::ServerContext* context,
                                       const v1::GetBlocksRequest* request,
                                       grpc::ServerWriter<v1::GetBlocksResponse>* writer) {
  if (auto s = ValidateSequenceId(request->sequence_id()); !s.ok()) return ToGrpc(s);
  const std::string key = SequenceKey(request->sequence_id());
  absl::StatusOr<Sequence> sequence = Find(key);
  if (!sequence.ok()) return ToGrpc(sequence.status());

  std::vector<storage::BlockId> ids;
  if (request->blocks().empty()) {
    absl::StatusOr<std::vector<storage::BlockId>> all = store_->ListBlocks(key);
    if (!all.ok()) return ToGrpc(all.status());
    ids = *std::move(all);
  } else {
    ids.reserve(request->blocks_size());
    for (int i = 0; i < request->blocks_size(); ++i) {
      const v1::BlockRef& ref = request->blocks(i);
      if (auto s = ValidateBlockRef(ref.layer(), ref.block_index(), sequence->profile,
                                    absl::StrCat("blocks[", i, "]"));
          !s.ok()) {
        return ToGrpc(s);
      }
      ids.push_back({ref.layer(), ref.block_index()});
    }
  }

  // Read and send in batches that fit one reply each, so memory stays bounded however many
  // blocks were asked for.
  const uint64_t block_bytes = 2 * BlockKeyBytes(sequence->profile);
  const size_t per_reply =
      std::max<uint64_t>(1, options_.max_reply_bytes / std::max<uint64_t>(1, block_bytes));
  std::vector<storage::BlockData> batch;
  for (size_t begin = 0; begin < ids.size(); begin += per_reply) {
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    const size_t count = std::min(per_reply, ids.size() - begin);
    absl::Status s =
        store_->GetBlocks(key, absl::MakeConstSpan(ids).subspan(begin, count), &batch);
    if (!s.ok()) return ToGrpc(s);
    v1::GetBlocksResponse reply;
    reply.set_sequence_id(request->sequence_id());
    for (storage::BlockData& data : batch) *reply.add_blocks() = ToProto(std::move(data));
    if (!writer->Write(reply)) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    blocks_got_.fetch_add(count, std::memory_order_relaxed);
  }
  return grpc::Status::OK;
}

grpc::Status KvStoreService::DropSequence(grpc::ServerContext*,
                                          const v1::DropSequenceRequest* request,
                                          v1::DropSequenceResponse* response) {
  if (auto s = ValidateSequenceId(request->sequence_id()); !s.ok()) return ToGrpc(s);
  const std::string key = SequenceKey(request->sequence_id());
  absl::MutexLock lock(&mu_);
  if (!sequences_.contains(key)) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("sequence_id ", request->sequence_id(), " is not stored"));
  }
  absl::StatusOr<storage::DropResult> dropped = store_->DropSequence(key);
  if (!dropped.ok()) return ToGrpc(dropped.status());
  sequences_.erase(key);
  response->set_blocks_dropped(dropped->blocks);
  response->set_bytes_dropped(dropped->bytes);
  spdlog::info("dropped sequence {} ({} blocks, {} bytes)", request->sequence_id(),
               dropped->blocks, dropped->bytes);
  return grpc::Status::OK;
}

grpc::Status KvStoreService::Stats(grpc::ServerContext*, const v1::StatsRequest*,
                                   v1::StatsResponse* response) {
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
  }
  response->set_blocks_put(blocks_put_.load(std::memory_order_relaxed));
  response->set_blocks_got(blocks_got_.load(std::memory_order_relaxed));
  return grpc::Status::OK;
}

}  // namespace kvstar::server
