// ClientImpl: channel, backend, staging, the shared slot pool, the data plane choice, the offload
// thread and the sequences; retrieval runs in its RetrievalScheduler (retrieval_scheduler.h).
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/channel.h"
#include "client/client_impl.h"
#include "spdlog/spdlog.h"

namespace kvstar {

uint32_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
    case DType::kFp16:
      return 2;
    case DType::kFp32:
      return 4;
  }
  return 0;
}

uint64_t ModelProfile::block_key_bytes() const {
  return uint64_t{block_size} * num_kv_heads * head_dim * DTypeBytes(dtype);
}

uint64_t ModelProfile::query_bytes() const {
  return uint64_t{num_q_heads} * head_dim * DTypeBytes(dtype);
}

const char* BackendName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kHost:
      return "host";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

const char* DataPlaneName(DataPlane plane) {
  switch (plane) {
    case DataPlane::kAuto:
      return "auto";
    case DataPlane::kSharedMemory:
      return "shared-memory";
    case DataPlane::kGrpcBytes:
      return "grpc-bytes";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  if (absl::Status tls = client_internal::CheckTlsOptions(options); !tls.ok()) return tls;
  absl::StatusOr<std::unique_ptr<client_internal::DeviceBackend>> backend =
      client_internal::SelectBackend(options.backend, options.cuda_device);
  if (!backend.ok()) return backend.status();
  auto client = std::make_unique<client_internal::ClientImpl>(options, std::move(*backend));
  if (absl::Status status = client->Init(); !status.ok()) return status;
  return std::unique_ptr<Client>(std::move(client));
}

namespace client_internal {
namespace {

v1::DType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return v1::DTYPE_BF16;
    case DType::kFp16:
      return v1::DTYPE_FP16;
    case DType::kFp32:
      return v1::DTYPE_FP32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

}  // namespace

ClientImpl::ClientImpl(const ClientOptions& options, std::unique_ptr<DeviceBackend> backend)
    : options_(options), backend_(std::move(backend)) {}

absl::Status ClientImpl::Init() {
  staging_ = std::make_unique<StagingPool>(backend_.get(), options_.staging_budget_bytes);
  absl::StatusOr<StreamHandle> stream = backend_->CreateStream();
  if (!stream.ok()) return stream.status();
  query_stream_ = *stream;
  {
    absl::MutexLock lock(&mu_);
    channel_ = MakeChannel(options_, options_.address);
    stub_ = v1::KvStore::NewStub(channel_);
  }
  offload_thread_ = std::thread([this] { OffloadLoop(); });
  scheduler_ = std::make_unique<RetrievalScheduler>(this);
  return absl::OkStatus();
}

ClientImpl::~ClientImpl() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (offload_thread_.joinable()) offload_thread_.join();
  scheduler_.reset();  // before the sequences its jobs point to
  std::map<std::string, std::unique_ptr<SequenceImpl>> sequences;
  {
    absl::MutexLock lock(&mu_);
    // Blocks never sent: give their staging back.
    for (OffloadItem& item : offload_queue_) {
      backend_->WaitEvent(item.ready).IgnoreError();
      backend_->ReleaseEvent(item.ready);
      staging_->Release(item.staging);
    }
    offload_queue_.clear();
    sequences = std::move(sequences_);
  }
  sequences.clear();
  {
    absl::MutexLock lock(&mu_);
    plane_.reset();      // every copy from it completed with its sequence
    slot_pool_.reset();  // every sequence left it
  }
  if (query_stream_ != nullptr) backend_->DestroyStream(query_stream_);
  staging_.reset();
}

std::shared_ptr<v1::KvStore::Stub> ClientImpl::stub() const {
  absl::MutexLock lock(&mu_);
  return stub_;
}

void ClientImpl::PrepareContext(grpc::ClientContext* context) const {
  client_internal::PrepareContext(options_, context);
}

absl::Status ClientImpl::CreateSlotPool(const SlotPoolOptions& options) {
  absl::MutexLock lock(&mu_);
  if (slot_pool_ != nullptr) {
    return absl::FailedPreconditionError("CreateSlotPool: the client already has a slot pool");
  }
  if (!sequences_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CreateSlotPool: ", sequences_.size(), " sequences are open with pools of their own"));
  }
  absl::StatusOr<std::shared_ptr<SlotPool>> pool = SlotPool::Create(backend_.get(), options);
  if (!pool.ok()) return pool.status();
  slot_pool_ = *std::move(pool);
  spdlog::info("kvstar client: shared slot pool of {} slots of {} bytes ({} headroom), {}",
               options.num_slots, options.slot_bytes, options.headroom_slots,
               options.memory != nullptr ? "the engine's memory" : "allocated by the library");
  return absl::OkStatus();
}

absl::StatusOr<SlotPoolStats> ClientImpl::slot_pool_stats() const {
  absl::MutexLock lock(&mu_);
  if (slot_pool_ == nullptr) {
    return absl::FailedPreconditionError("slot_pool_stats: the client has no shared slot pool");
  }
  return slot_pool_->stats();
}

std::pair<uint32_t, uint64_t> ClientImpl::DueSlotForSeal(uint32_t stride) const {
  absl::MutexLock lock(&mu_);
  if (!options_.stagger_retrievals || stride <= 1) return {0, 0};
  std::vector<uint32_t> users(stride, 0);
  for (const auto& [id, sequence] : sequences_) {
    if (sequence->sealed() && sequence->config().retrieval_stride == stride) {
      ++users[sequence->due_slot() % stride];
    }
  }
  // Among the least used slots, the first in bit-reversed order (0, 4, 2, 6, 1, ... for 8): any
  // number of sequences spreads evenly, not on neighbouring steps.
  uint32_t bits = 0;
  while ((1u << bits) < stride) ++bits;
  uint32_t best = 0;  // i = 0 reverses to slot 0
  for (uint32_t i = 1; i < (1u << bits); ++i) {
    uint32_t slot = 0;
    for (uint32_t b = 0; b < bits; ++b) slot |= ((i >> b) & 1u) << (bits - 1 - b);
    if (slot < stride && users[slot] < users[best]) best = slot;
  }
  return {best, steps_};
}

absl::StatusOr<Sequence*> ClientImpl::CreateSequence(const std::string& sequence_id,
                                                     const ModelProfile& profile,
                                                     const KvstarConfig& config,
                                                     const SequenceOptions& options) {
  {
    absl::MutexLock lock(&mu_);
    if (sequences_.count(sequence_id) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("sequence ", sequence_id, " is already open in this client"));
    }
  }
  v1::CreateSequenceRequest request;
  request.set_sequence_id(sequence_id);
  v1::ModelProfile* proto_profile = request.mutable_profile();
  proto_profile->set_num_layers(profile.num_layers);
  proto_profile->set_num_q_heads(profile.num_q_heads);
  proto_profile->set_num_kv_heads(profile.num_kv_heads);
  proto_profile->set_head_dim(profile.head_dim);
  proto_profile->set_block_size(profile.block_size);
  proto_profile->set_dtype(ToProto(profile.dtype));
  v1::KvstarConfig* knobs = request.mutable_config();
  knobs->set_init_window_sz(config.init_window_sz);
  knobs->set_local_window_sz(config.local_window_sz);
  knobs->set_sparse_ratio(config.sparse_ratio);
  knobs->set_retrieval_stride(config.retrieval_stride);
  knobs->set_blk_repre_dim_prune_ratio(config.blk_repre_dim_prune_ratio);
  knobs->set_blk_repre_inner_token_merge(config.blk_repre_inner_token_merge);
  knobs->set_block_vote(static_cast<v1::BlockVote>(config.block_vote));
  knobs->set_representation_format(
      static_cast<v1::RepresentationFormat>(config.representation_format));

  if (absl::Status status = EnsureDataPlane();
      !status.ok() && options_.data_plane == DataPlane::kSharedMemory) {
    return status;
  }
  // Otherwise a failed choice leaves bytes for now; it is tried again before the next retrieval.
  std::shared_ptr<SlotPool> pool;
  {
    absl::MutexLock lock(&mu_);
    pool = slot_pool_;
  }
  auto sequence = std::make_unique<SequenceImpl>(this, sequence_id, profile, config);
  if (absl::Status status = sequence->Init(options, std::move(pool)); !status.ok()) return status;
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::CreateSequenceResponse response;
  grpc::Status rpc = stub()->CreateSequence(&context, request, &response);
  if (!rpc.ok()) return FromGrpc(rpc, "CreateSequence");
  absl::MutexLock lock(&mu_);
  Sequence* result = sequence.get();
  sequences_[sequence_id] = std::move(sequence);
  return result;
}

absl::Status ClientImpl::DropSequence(const std::string& sequence_id) {
  WaitOffloadsIdle();
  std::unique_ptr<SequenceImpl> sequence;
  {
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(sequence_id);
    if (found == sequences_.end()) {
      return absl::NotFoundError(absl::StrCat("sequence ", sequence_id, " is not open"));
    }
    sequence = std::move(found->second);
    sequences_.erase(found);  // no later Step submits it
  }
  // A retrieval in flight may still point to it until its job ends.
  scheduler_->Forget(sequence.get());
  sequence.reset();
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::DropSequenceRequest request;
  request.set_sequence_id(sequence_id);
  v1::DropSequenceResponse response;
  return FromGrpc(stub()->DropSequence(&context, request, &response), "DropSequence");
}

absl::Status ClientImpl::Step() {
  absl::MutexLock lock(&mu_);
  ++steps_;
  std::vector<SequenceImpl*> due;
  for (auto& [id, sequence] : sequences_) {
    if (sequence->AdvanceStep()) due.push_back(sequence.get());
  }
  // Under mu_: DropSequence cannot destroy a due sequence before the scheduler holds it.
  scheduler_->Submit(std::move(due));
  return scheduler_->TakeError();
}

absl::Status ClientImpl::Flush() {
  WaitOffloadsIdle();
  std::vector<SequenceImpl*> sequences;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, sequence] : sequences_) sequences.push_back(sequence.get());
  }
  absl::Status first;
  for (SequenceImpl* sequence : sequences) {
    absl::Status status = sequence->Flush();
    if (first.ok()) first = status;
  }
  return first;
}

absl::Status ClientImpl::Reconnect(const std::string& address) {
  std::shared_ptr<grpc::Channel> channel = MakeChannel(options_, address);
  absl::MutexLock lock(&mu_);
  channel_ = channel;
  stub_ = v1::KvStore::NewStub(channel_);
  // Another server: choose again (loads in flight keep the old mapping alive until they end).
  plane_.reset();
  return absl::OkStatus();
}

DataPlane ClientImpl::data_plane() const {
  absl::MutexLock lock(&mu_);
  return plane_ != nullptr ? plane_->kind() : DataPlane::kAuto;
}

absl::Status ClientImpl::EnsureDataPlane() {
  absl::MutexLock resolving(&resolve_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (plane_ != nullptr) return absl::OkStatus();
  }
  return ResolveDataPlane();
}

absl::Status ClientImpl::ResolveDataPlane() {
  std::shared_ptr<const BlockDataPlane> plane = GrpcBytesDataPlane();
  std::string why;
  if (options_.data_plane == DataPlane::kGrpcBytes) {
    why = "requested";
  } else {
    absl::StatusOr<std::unique_ptr<SharedSegment>> mapped = MapServerSegment(&why);
    if (!mapped.ok()) {
      if (options_.data_plane != DataPlane::kSharedMemory) return mapped.status();
      return absl::Status(mapped.status().code(),
                          absl::StrCat("data_plane shared-memory requested, but the server could "
                                       "not be asked: ",
                                       mapped.status().message()));
    }
    if (*mapped != nullptr) {
      why = absl::StrCat("the server runs on this host; this tenant's segment ", (*mapped)->name(),
                         " of ", (*mapped)->size(), " bytes mapped read-only",
                         backend_->kind() == BackendKind::kCuda ? " and registered with CUDA" : "");
      plane = MakeSharedMemoryDataPlane(*std::move(mapped));
    } else if (options_.data_plane == DataPlane::kSharedMemory) {
      return absl::FailedPreconditionError(
          absl::StrCat("data_plane shared-memory requested, but ", why));
    }
  }
  bool changed = false;
  {
    absl::MutexLock lock(&mu_);
    changed = plane_ == nullptr || plane_->kind() != plane->kind() ||
              plane_->segment_name() != plane->segment_name();
    plane_ = plane;
  }
  if (changed) {
    spdlog::info("kvstar client: {} data plane ({})", DataPlaneName(plane->kind()), why);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SharedSegment>> ClientImpl::MapServerSegment(std::string* why_not) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::ServerInfoResponse info;
  grpc::Status rpc = stub()->GetServerInfo(&context, v1::ServerInfoRequest(), &info);
  if (rpc.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    *why_not = "the server has no GetServerInfo (an older server)";
    return nullptr;
  }
  if (!rpc.ok()) return FromGrpc(rpc, "GetServerInfo");
  absl::StatusOr<std::string> host_id = ThisHostId();
  if (!host_id.ok()) {
    *why_not = std::string(host_id.status().message());
    return nullptr;
  }
  if (info.host_id() != *host_id) {
    *why_not = absl::StrCat("the server runs on another host (host_id ", info.host_id(),
                            ", this host's boot_id ", *host_id, ")");
    return nullptr;
  }
  if (info.shared_memory_socket().empty() || info.shared_memory_bytes() == 0) {
    *why_not =
        "the server exports no shared-memory segment to this tenant (--shared_memory_bytes=0, "
        "no room left of it, or a server too old to give each tenant its own segment)";
    return nullptr;
  }
  absl::StatusOr<std::unique_ptr<SharedSegment>> segment = SharedSegment::Receive(
      info.shared_memory_socket(), options_.bearer_token, options_.rpc_timeout_ms, backend_.get());
  if (!segment.ok()) {
    *why_not = absl::StrCat("the server runs on this host but its segment is unusable: ",
                            segment.status().message());
    spdlog::warn("kvstar client: {}; block bytes travel in gRPC replies", *why_not);
    return nullptr;
  }
  return segment;
}

ClientStats ClientImpl::stats() const { return scheduler_->stats(); }

absl::StatusOr<std::shared_ptr<const BlockDataPlane>> ClientImpl::DataPlaneForRetrieval(
    bool ask_again) {
  absl::Status status;
  if (ask_again) {
    absl::MutexLock resolving(&resolve_mu_);
    status = ResolveDataPlane();
  } else {
    status = EnsureDataPlane();
  }
  if (!status.ok() && options_.data_plane == DataPlane::kSharedMemory) return status;
  absl::MutexLock lock(&mu_);
  // A failed choice leaves bytes for now; it is tried again before the next retrieval.
  return plane_ != nullptr ? plane_ : GrpcBytesDataPlane();
}

void ClientImpl::EnqueueOffload(OffloadItem item) {
  absl::MutexLock lock(&mu_);
  offload_queue_.push_back(item);
}

void ClientImpl::WaitOffloadsIdle() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](ClientImpl* client) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return client->offload_queue_.empty() && !client->offload_in_flight_;
      },
      this));
}

void ClientImpl::OffloadLoop() {
  while (true) {
    std::vector<OffloadItem> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ClientImpl* client) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return !client->offload_queue_.empty() || client->stopping_;
          },
          this));
      if (stopping_) return;
      // One stream carries what is queued now, up to 64 MiB, so a Flush waits for little.
      uint64_t bytes = 0;
      while (!offload_queue_.empty() && bytes < (uint64_t{64} << 20)) {
        bytes += 2 * offload_queue_.front().key_bytes;
        batch.push_back(offload_queue_.front());
        offload_queue_.pop_front();
      }
      offload_in_flight_ = true;
    }
    SendBatch(batch).IgnoreError();  // outcomes go to each sequence
    absl::MutexLock lock(&mu_);
    offload_in_flight_ = false;
  }
}

absl::Status ClientImpl::SendBatch(std::vector<OffloadItem>& batch) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::PutBlocksResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutBlocksRequest>> writer =
      stub()->PutBlocks(&context, &response);
  std::map<SequenceImpl*, uint64_t> blocks_of;
  bool writing = true;
  absl::Status local;
  v1::PutBlocksRequest message;
  uint64_t message_bytes = 0;
  auto send = [&]() {
    if (message.blocks_size() > 0 && writing) writing = writer->Write(message);
    message.Clear();
    message_bytes = 0;
  };
  for (OffloadItem& item : batch) {
    ++blocks_of[item.sequence];
    absl::Status ready = backend_->WaitEvent(item.ready);
    backend_->ReleaseEvent(item.ready);
    if (!ready.ok() && local.ok()) local = ready;
    const uint64_t block_bytes = 2 * item.key_bytes;
    if (writing && ready.ok()) {
      if (message.blocks_size() > 0 && (message.sequence_id() != item.sequence->id() ||
                                        message_bytes + block_bytes > options_.max_message_bytes)) {
        send();
      }
      message.set_sequence_id(item.sequence->id());
      v1::Block* block = message.add_blocks();
      const char* staged = static_cast<const char*>(item.staging);
      block->set_layer(item.layer);
      block->set_block_index(item.block_index);
      block->set_key(staged, item.key_bytes);
      block->set_value(staged + item.key_bytes, item.key_bytes);
      // XXH3-64 of K followed by V: K and V are contiguous in staging.
      block->set_checksum(XXH3_64bits(staged, block_bytes));
      message_bytes += block_bytes;
    }
    staging_->Release(item.staging);
  }
  send();
  writer->WritesDone();
  absl::Status status = FromGrpc(writer->Finish(), "PutBlocks");
  if (status.ok()) status = local;
  for (auto& [sequence, blocks] : blocks_of) sequence->OffloadDone(blocks, status);
  return status;
}

absl::StatusOr<v1::SealResponse> ClientImpl::SealRpc(const v1::SealRequest& request) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::SealResponse response;
  grpc::Status status = stub()->Seal(&context, request, &response);
  if (!status.ok()) return FromGrpc(status, "Seal");
  return response;
}

absl::Status ClientImpl::GetBlocksRpc(const std::string& sequence_id, uint32_t layer,
                                      const std::vector<uint32_t>& blocks,
                                      std::vector<v1::Block>* out) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::GetBlocksRequest request;
  request.set_sequence_id(sequence_id);
  for (uint32_t block : blocks) {
    v1::BlockRef* ref = request.add_blocks();
    ref->set_layer(layer);
    ref->set_block_index(block);
  }
  std::unique_ptr<grpc::ClientReader<v1::GetBlocksResponse>> reader =
      stub()->GetBlocks(&context, request);
  v1::GetBlocksResponse reply;
  while (reader->Read(&reply)) {
    for (v1::Block& block : *reply.mutable_blocks()) out->push_back(std::move(block));
  }
  return FromGrpc(reader->Finish(), "GetBlocks");
}

}  // namespace client_internal
}  // namespace kvstar
