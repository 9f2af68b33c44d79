#include "server/kvstore_service.h"

#include <algorithm>
#include <fstream>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "spdlog/spdlog.h"
#include "storage/log_value.h"

namespace kvstar::server {
namespace {

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

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// A call refused before it started: finishes at once with `status`.
template <typename Reactor>
class Refused final : public Reactor {
 public:
  explicit Refused(const absl::Status& status) { this->Finish(ToGrpc(status)); }
  void OnDone() override { delete this; }
};

size_t PoolThreads(size_t asked) {
  if (asked > 0) return asked;
  return std::max<size_t>(16, 4 * std::max(1u, std::thread::hardware_concurrency()));
}

// Threads that drop sequences: a store's drop can take long (the directory store unlinks every
// file of the sequence, thousands on NFS; RocksDB's is one synced write and reclaims the space
// in the background), and drops waiting for each other must not hold the threads other calls
// need. Drops wait on the disk, not the CPU: with 2 threads, bench/load_test's 64 clients queued
// 50-60 drops and a 256 MiB drop waited 0.6-1.1 s behind them; with 8 it took 87-293 ms, since
// RocksDB commits the concurrent synced writes together.
constexpr size_t kDropThreads = 8;

}  // namespace

// What the watchdog needs of a stream: when it last made progress, and how to end it. Streams
// are owned by shared pointers (the service's registry, and each piece of work queued for the
// stream), so that work still queued when gRPC is done with the call never outlives it.
class KvStoreService::Stream : public std::enable_shared_from_this<Stream> {
 public:
  Stream(KvStoreService* service, std::string tenant)
      : service_(service), tenant_(std::move(tenant)), last_active_ms_(NowMs()) {}
  virtual ~Stream() { service_->limits_.CloseStream(tenant_); }

  // While busy the server works for the stream, which is never idle then.
  void SetBusy(bool busy) {
    busy_.store(busy);
    last_active_ms_.store(NowMs());
  }
  bool IdleBefore(int64_t cutoff_ms) const { return !busy_.load() && last_active_ms_ < cutoff_ms; }
  // Ends the stream because it made no progress for `timeout_ms`.
  virtual void Expire(uint64_t timeout_ms) = 0;

 protected:
  KvStoreService* const service_;
  const std::string tenant_;

 private:
  std::atomic<bool> busy_{false};
  std::atomic<int64_t> last_active_ms_;
};

// One PutBlocks stream: reads a message's bytes, then on the pool parses, checks and queues it
// (writing batches to the store), then reads the next; nothing runs while the client is silent.
class KvStoreService::PutReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer>,
                                         public Stream {
 public:
  PutReactor(KvStoreService* service, grpc::CallbackServerContext* context, std::string tenant,
             grpc::ByteBuffer* response)
      : Stream(service, std::move(tenant)),
        context_(context),
        response_(response),
        put_(service->node_->NewPutStream(tenant_)) {}
  ~PutReactor() override { service_->limits_.ReleasePutBytes(tenant_, reserved_); }

  void Start() { ReadNext(); }

  void OnReadDone(bool ok) override {
    SetBusy(true);
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
    }
    std::shared_ptr<Stream> self = shared_from_this();
    if (!ok) {
      service_->pool_.Schedule([this, self] { Complete(); });
    } else {
      service_->pool_.Schedule([this, self] { Handle(); });
    }
  }
  // A cancelled stream with a read pending is finished now; one with work queued or running is
  // finished by that work, which sees the flag.
  void OnCancel() override {
    std::shared_ptr<Stream> self = shared_from_this();  // Finish may run OnDone inline
    cancelled_.store(true);
    bool idle;
    {
      absl::MutexLock lock(&mu_);
      idle = reading_;
    }
    if (idle) FinishOnce(absl::CancelledError("PutBlocks cancelled by the client"));
  }
  void OnDone() override { service_->Unregister(this); }

  void Expire(uint64_t timeout_ms) override {
    spdlog::warn("event=stream_idle method=PutBlocks tenant={} idle_ms={} action=ended",
                 storage::LogValue(tenant_), timeout_ms);
    FinishOnce(absl::DeadlineExceededError(
        absl::StrCat("PutBlocks stream sent no message for ", timeout_ms,
                     " ms (--stream_idle_timeout_ms=", timeout_ms, ")")));
  }

 private:
  // Runs on the pool: one message received.
  void Handle() {
    if (finished()) return;
    const uint64_t index = put_->messages();
    // The same parse gRPC runs for a typed method; protobuf rejects a proto3 string field that
    // is not UTF-8. Nothing of an undecodable message is queued.
    if (!grpc::SerializationTraits<v1::PutBlocksRequest>::Deserialize(&received_, &message_).ok()) {
      const absl::Status undecodable = absl::InvalidArgumentError(
          absl::StrCat("PutBlocks message ", index, " could not be decoded as ",
                       v1::PutBlocksRequest::descriptor()->full_name(),
                       ": it is not a protobuf message of that type, or one of its string fields "
                       "(sequence_id, blocks[].shared.segment) is not valid UTF-8"));
      spdlog::warn("event=put_rejected code={} message={}",
                   absl::StatusCodeToString(undecodable.code()),
                   storage::LogValue(undecodable.message()));
      return FinishOnce(undecodable);
    }
    uint64_t bytes = 0;
    for (int i = 0; i < message_.blocks_size(); ++i) {
      const v1::Block& block = message_.blocks(i);
      if (block.has_shared()) {
        return FinishOnce(absl::UnimplementedError(
            absl::StrCat("PutBlocks message ", index, ": blocks[", i,
                         "].shared: shared-memory blocks are not accepted by PutBlocks yet")));
      }
      bytes += block.key().size() + block.value().size();
    }
    absl::Status admitted = service_->limits_.ReservePutBytes(tenant_, bytes);
    if (!admitted.ok() && put_->queued_bytes() > 0) {
      // Write what this stream holds to make room, then ask again.
      if (absl::Status s = put_->Flush(); !s.ok()) return FinishOnce(s);
      Reconcile();
      admitted = service_->limits_.ReservePutBytes(tenant_, bytes);
    }
    if (!admitted.ok()) {
      return FinishOnce(absl::Status(
          admitted.code(), absl::StrCat("PutBlocks message ", index, ": ", admitted.message())));
    }
    reserved_ += bytes;
    std::vector<storage::BlockData> blocks(message_.blocks_size());
    for (int i = 0; i < message_.blocks_size(); ++i) {
      v1::Block& block = *message_.mutable_blocks(i);
      blocks[i].id = {block.layer(), block.block_index()};
      blocks[i].checksum = block.checksum();
      blocks[i].key = std::move(*block.mutable_key());
      blocks[i].value = std::move(*block.mutable_value());
    }
    absl::Status added = put_->Add(message_.sequence_id(), std::move(blocks));
    Reconcile();
    if (!added.ok()) {
      spdlog::warn("event=put_rejected code={} message={}", absl::StatusCodeToString(added.code()),
                   storage::LogValue(added.message()));
      return FinishOnce(added);
    }
    message_.Clear();
    SetBusy(false);
    if (cancelled_.load()) return FinishOnce(absl::CancelledError("PutBlocks cancelled"));
    ReadNext();
  }

  // Starts the next read unless the stream is finished (then gRPC may be done with the call).
  void ReadNext() {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    reading_ = true;
    StartRead(&received_);
  }

  // Runs on the pool: the client finished sending (or went away).
  void Complete() {
    if (finished()) return;
    if (cancelled_.load() || context_->IsCancelled()) {
      return FinishOnce(absl::CancelledError("PutBlocks cancelled by the client"));
    }
    absl::Status stored = put_->Flush();
    Reconcile();
    if (!stored.ok()) {
      spdlog::warn("event=put_rejected code={} message={}", absl::StatusCodeToString(stored.code()),
                   storage::LogValue(stored.message()));
      return FinishOnce(stored);
    }
    v1::PutBlocksResponse response;
    response.set_blocks_written(put_->blocks_written());
    response.set_bytes_written(put_->bytes_written());
    bool own_buffer = false;
    if (grpc::Status s = grpc::SerializationTraits<v1::PutBlocksResponse>::Serialize(
            response, response_, &own_buffer);
        !s.ok()) {
      return FinishOnce(absl::InternalError(
          absl::StrCat("PutBlocks response could not be serialized: ", s.error_message())));
    }
    spdlog::debug("event=put_stored blocks={} bytes={} messages={}", put_->blocks_written(),
                  put_->bytes_written(), put_->messages());
    FinishOnce(absl::OkStatus());
  }

  // The bytes this stream holds admitted are the bytes its PutStream still queues.
  void Reconcile() {
    const uint64_t queued = put_->queued_bytes();
    if (reserved_ > queued) {
      service_->limits_.ReleasePutBytes(tenant_, reserved_ - queued);
      reserved_ = queued;
    }
  }

  bool finished() {
    absl::MutexLock lock(&mu_);
    return finished_;
  }
  // The last thing any path does with the reactor: gRPC may be done with it right after.
  void FinishOnce(const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(ToGrpc(status));
  }

  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;  // gRPC's; holds a serialized v1::PutBlocksResponse
  // Touched by one pool task at a time: a read is started only after the last task is done.
  const std::unique_ptr<PutStream> put_;
  grpc::ByteBuffer received_;  // the message's bytes, as read
  v1::PutBlocksRequest message_;
  uint64_t reserved_ = 0;  // in-flight bytes admitted by limits_ and not yet released

  std::atomic<bool> cancelled_{false};
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;  // a read is pending: no work queued or running
};

// One server-streaming call (Retrieve, GetBlocks). Its work runs on the pool and hands each
// reply to Write, which waits until gRPC took it: a client that stops reading is bounded by the
// idle timeout, which cancels the call.
template <typename Response>
class KvStoreService::WriteReactor final : public grpc::ServerWriteReactor<Response>,
                                           public Stream {
 public:
  WriteReactor(KvStoreService* service, grpc::CallbackServerContext* context, std::string tenant)
      : Stream(service, std::move(tenant)), context_(context) {}

  const std::string& tenant() const { return tenant_; }
  bool cancelled() const { return cancelled_.load(); }

  // Sends one reply; false when the client went away.
  bool Write(Response message) {
    {
      absl::MutexLock lock(&mu_);
      if (!write_ok_) return false;
      pending_ = std::move(message);
      writing_ = true;
    }
    SetBusy(false);
    this->StartWrite(&pending_);
    bool ok;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &WriteReactor::NotWriting));
      ok = write_ok_;
    }
    SetBusy(true);
    return ok;
  }

  // The last thing the call's work does with the reactor.
  void FinishOnce(const absl::Status& status) {
    this->Finish(cancelled() ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled")
                             : ToGrpc(status));
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    write_ok_ = write_ok_ && ok;
  }
  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { service_->Unregister(this); }

  void Expire(uint64_t timeout_ms) override {
    spdlog::warn(
        "event=stream_idle tenant={} idle_ms={} action=cancelled (the client read no reply)",
        storage::LogValue(tenant_), timeout_ms);
    cancelled_.store(true);
    context_->TryCancel();
  }

 private:
  bool NotWriting() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !writing_; }

  grpc::CallbackServerContext* const context_;
  std::atomic<bool> cancelled_{false};
  absl::Mutex mu_;
  Response pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_ok_ ABSL_GUARDED_BY(mu_) = true;
};

KvStoreService::KvStoreService(std::unique_ptr<StorageNode> node, ServiceOptions options)
    : options_(options),
      node_(std::move(node)),
      limits_(options.limits, [this](bool serving) { ReportServing(serving); }),
      drop_pool_(kDropThreads),
      pool_(PoolThreads(options.worker_threads)) {
  std::ifstream boot_id("/proc/sys/kernel/random/boot_id");
  std::getline(boot_id, host_id_);
  if (options_.stream_idle_timeout_ms > 0) watchdog_ = std::thread([this] { WatchIdleStreams(); });
}

KvStoreService::~KvStoreService() {
  health_.store(nullptr);
  {
    absl::MutexLock lock(&streams_mu_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
}

absl::StatusOr<std::unique_ptr<KvStoreService>> KvStoreService::Create(storage::BlockStore* store,
                                                                       ServiceOptions options) {
  NodeOptions node_options;
  node_options.max_reply_bytes = options.max_reply_bytes;
  node_options.retrieval_threads = options.retrieval_threads;
  node_options.copy_threads = options.copy_threads;
  node_options.segment_resident_blocks = options.segment_resident_blocks;
  node_options.shared_memory = options.shared_memory;
  absl::StatusOr<std::unique_ptr<StorageNode>> node = StorageNode::Create(store, node_options);
  if (!node.ok()) return node.status();
  return std::unique_ptr<KvStoreService>(new KvStoreService(*std::move(node), options));
}

void KvStoreService::SetHealthCheckService(grpc::HealthCheckServiceInterface* health) {
  health_.store(health);
  if (health != nullptr) health->SetServingStatus(limits_.CanTakeWork());
}

void KvStoreService::ReportServing(bool serving) {
  spdlog::info("event=health status={} reason={}", serving ? "SERVING" : "NOT_SERVING",
               serving ? "below_limits" : "node_wide_limit_reached");
  if (grpc::HealthCheckServiceInterface* health = health_.load()) {
    health->SetServingStatus(serving);
  }
}

absl::StatusOr<std::string> KvStoreService::Tenant(
    const grpc::CallbackServerContext* context) const {
  if (options_.auth == nullptr) return std::string(kDefaultTenant);
  const auto& metadata = context->client_metadata();
  auto found = metadata.find("authorization");
  return options_.auth->TenantOf(
      found == metadata.end() ? absl::string_view()
                              : absl::string_view(found->second.data(), found->second.size()));
}

std::optional<std::string> KvStoreService::TenantOrFinish(
    const grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor) const {
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (tenant.ok()) return *std::move(tenant);
  reactor->Finish(ToGrpc(tenant.status()));
  return std::nullopt;
}

void KvStoreService::Register(std::shared_ptr<Stream> stream) {
  absl::MutexLock lock(&streams_mu_);
  Stream* key = stream.get();
  streams_.emplace(key, std::move(stream));
}

void KvStoreService::Unregister(Stream* stream) {
  std::shared_ptr<Stream> owned;
  {
    absl::MutexLock lock(&streams_mu_);
    auto it = streams_.find(stream);
    if (it == streams_.end()) return;
    owned = std::move(it->second);
    streams_.erase(it);
  }
  // `owned` may be the last owner: the stream is destroyed here, after the lock is released.
}

void KvStoreService::WatchIdleStreams() {
  const uint64_t timeout_ms = options_.stream_idle_timeout_ms;
  const absl::Duration period = absl::Milliseconds(std::clamp<uint64_t>(timeout_ms / 4, 10, 1000));
  while (true) {
    std::vector<std::shared_ptr<Stream>> idle;
    {
      absl::MutexLock lock(&streams_mu_);
      streams_mu_.AwaitWithTimeout(absl::Condition(&stopping_), period);
      if (stopping_) return;
      const int64_t cutoff = NowMs() - static_cast<int64_t>(timeout_ms);
      for (const auto& [key, stream] : streams_) {
        if (stream->IdleBefore(cutoff)) idle.push_back(stream);
      }
    }
    // Outside the lock: ending a stream may run its OnDone, which takes streams_mu_.
    for (const std::shared_ptr<Stream>& stream : idle) stream->Expire(timeout_ms);
  }
}

grpc::ServerUnaryReactor* KvStoreService::CreateSequence(grpc::CallbackServerContext* context,
                                                         const v1::CreateSequenceRequest* request,
                                                         v1::CreateSequenceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  pool_.Schedule([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<CreateResult> created = node_->CreateSequence(
        tenant, request->sequence_id(), request->profile(), request->config());
    if (created.ok()) {
      *response->mutable_profile() = created->profile;
      *response->mutable_config() = created->config;
      response->set_created(created->created);
    }
    reactor->Finish(ToGrpc(created.status()));
  });
  return reactor;
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvStoreService::PutBlocks(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  using Reactor = grpc::ServerReadReactor<grpc::ByteBuffer>;
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return new Refused<Reactor>(tenant.status());
  if (absl::Status s = limits_.OpenStream(*tenant); !s.ok()) {
    spdlog::warn("event=put_refused code={} message={}", absl::StatusCodeToString(s.code()),
                 storage::LogValue(s.message()));
    return new Refused<Reactor>(s);
  }
  auto reactor = std::make_shared<PutReactor>(this, context, *std::move(tenant), response);
  PutReactor* raw = reactor.get();
  Register(std::move(reactor));
  raw->Start();
  return raw;
}

grpc::ServerUnaryReactor* KvStoreService::Seal(grpc::CallbackServerContext* context,
                                               const v1::SealRequest* request,
                                               v1::SealResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  pool_.Schedule([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<SealResult> sealed = node_->Seal(tenant, *request);
    if (sealed.ok()) {
      response->set_num_blocks(sealed->num_blocks);
      for (uint32_t layer = 0; layer < sealed->selections.size(); ++layer) {
        v1::LayerSelection* selection = response->add_selections();
        selection->set_layer(layer);
        selection->mutable_block_indices()->Add(sealed->selections[layer].begin(),
                                                sealed->selections[layer].end());
      }
    }
    reactor->Finish(ToGrpc(sealed.status()));
  });
  return reactor;
}

grpc::ServerWriteReactor<v1::RetrieveResponse>* KvStoreService::Retrieve(
    grpc::CallbackServerContext* context, const v1::RetrieveRequest* request) {
  using Base = grpc::ServerWriteReactor<v1::RetrieveResponse>;
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return new Refused<Base>(tenant.status());
  if (absl::Status s = limits_.OpenStream(*tenant); !s.ok()) return new Refused<Base>(s);
  auto reactor =
      std::make_shared<WriteReactor<v1::RetrieveResponse>>(this, context, *std::move(tenant));
  WriteReactor<v1::RetrieveResponse>* raw = reactor.get();
  raw->SetBusy(true);
  Register(reactor);
  pool_.Schedule([this, raw, request, reactor = std::move(reactor)] {
    absl::Status status = node_->Retrieve(
        raw->tenant(), *request,
        [&](RetrievedLayer& layer) {
          const v1::SequenceQueries& part = request->sequences(layer.request);
          v1::RetrieveResponse reply;
          reply.set_sequence_id(part.sequence_id());
          reply.set_decode_step(part.decode_step());
          reply.mutable_selection()->set_layer(layer.layer);
          reply.mutable_selection()->mutable_block_indices()->Add(layer.selected.begin(),
                                                                  layer.selected.end());
          for (const SharedBlockRef& ref : layer.shared_blocks) {
            v1::Block* block = reply.add_new_blocks();
            block->set_layer(ref.id.layer);
            block->set_block_index(ref.id.block_index);
            block->set_checksum(ref.checksum);
            v1::SharedMemoryRef* shared = block->mutable_shared();
            shared->set_segment(layer.shared_segment);
            shared->set_offset(ref.offset);
            shared->set_length(ref.key_length);
          }
          for (storage::BlockData& data : layer.blocks) {
            *reply.add_new_blocks() = ToProto(std::move(data));
          }
          if (!layer.blocks.empty() || !layer.shared_blocks.empty()) reply.set_more(layer.more);
          return raw->Write(std::move(reply));
        },
        [raw] { return raw->cancelled(); });
    raw->FinishOnce(status);
  });
  return raw;
}

grpc::ServerWriteReactor<v1::GetBlocksResponse>* KvStoreService::GetBlocks(
    grpc::CallbackServerContext* context, const v1::GetBlocksRequest* request) {
  using Base = grpc::ServerWriteReactor<v1::GetBlocksResponse>;
  absl::StatusOr<std::string> tenant = Tenant(context);
  if (!tenant.ok()) return new Refused<Base>(tenant.status());
  if (absl::Status s = limits_.OpenStream(*tenant); !s.ok()) return new Refused<Base>(s);
  auto reactor =
      std::make_shared<WriteReactor<v1::GetBlocksResponse>>(this, context, *std::move(tenant));
  WriteReactor<v1::GetBlocksResponse>* raw = reactor.get();
  raw->SetBusy(true);
  Register(reactor);
  pool_.Schedule([this, raw, request, reactor = std::move(reactor)] {
    std::vector<storage::BlockId> ids;
    ids.reserve(request->blocks_size());
    for (const v1::BlockRef& ref : request->blocks())
      ids.push_back({ref.layer(), ref.block_index()});
    absl::Status status = node_->GetBlocks(raw->tenant(), request->sequence_id(), ids,
                                           [&](std::vector<storage::BlockData>& batch) {
                                             if (raw->cancelled()) return false;
                                             v1::GetBlocksResponse reply;
                                             reply.set_sequence_id(request->sequence_id());
                                             for (storage::BlockData& data : batch)
                                               *reply.add_blocks() = ToProto(std::move(data));
                                             return raw->Write(std::move(reply));
                                           });
    raw->FinishOnce(status);
  });
  return raw;
}

grpc::ServerUnaryReactor* KvStoreService::DropSequence(grpc::CallbackServerContext* context,
                                                       const v1::DropSequenceRequest* request,
                                                       v1::DropSequenceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  drop_pool_.Schedule([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<storage::DropResult> dropped =
        node_->DropSequence(tenant, request->sequence_id());
    if (dropped.ok()) {
      response->set_blocks_dropped(dropped->blocks);
      response->set_bytes_dropped(dropped->bytes);
    }
    reactor->Finish(ToGrpc(dropped.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* KvStoreService::Stats(grpc::CallbackServerContext* context,
                                                const v1::StatsRequest*,
                                                v1::StatsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  // Without authentication there is one tenant, so it sees the node; with it, only the admin
  // tenant does, and every other tenant sees its own sequences and calls.
  const bool node_scope = options_.auth == nullptr ||
                          (!options_.admin_tenant.empty() && *tenant == options_.admin_tenant);
  // Counters only: cheap enough for gRPC's thread.
  const NodeStats stats = node_scope ? node_->Stats() : node_->TenantStats(*tenant);
  response->set_scope(node_scope ? "node" : "tenant");
  response->set_sequences(stats.sequences);
  for (const storage::TierStats& tier : stats.tiers) {
    v1::TierStats* out = response->add_tiers();
    out->set_name(tier.name);
    out->set_blocks(tier.blocks);
    out->set_bytes(tier.bytes);
    out->set_budget_bytes(tier.budget_bytes);
    out->set_hits(tier.hits);
    out->set_misses(tier.misses);
    out->set_evictions(tier.evictions);
    out->set_reclaim_pending_bytes(tier.reclaim_pending_bytes);
    response->set_corrupt_blocks(response->corrupt_blocks() + tier.corrupt_blocks);
  }
  response->set_blocks_put(stats.blocks_put);
  response->set_blocks_got(stats.blocks_got);
  response->set_retrievals(stats.retrievals);
  response->set_blocks_scored(stats.blocks_scored);
  response->set_blocks_sent(stats.blocks_sent);
  response->set_blocks_skipped_held(stats.blocks_skipped_held);
  response->set_blocks_sent_shared(stats.blocks_sent_shared);
  response->set_retrieve_micros(stats.retrieve_micros);
  response->set_retrieve_score_micros(stats.retrieve_score_micros);
  response->set_retrieve_wait_micros(stats.retrieve_wait_micros);
  response->set_retrieve_read_micros(stats.retrieve_read_micros);
  response->set_retrieve_copy_micros(stats.retrieve_copy_micros);
  response->set_retrieve_send_micros(stats.retrieve_send_micros);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* KvStoreService::GetServerInfo(grpc::CallbackServerContext* context,
                                                        const v1::ServerInfoRequest*,
                                                        v1::ServerInfoResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  response->set_host_id(host_id_);
  response->set_api_version("kvstar.v1");
  TenantSegments* segments = node_->shared_memory();
  if (segments != nullptr && !options_.shared_memory_socket.empty()) {
    const uint64_t bytes = segments->BytesFor(*tenant);
    response->set_shared_memory_bytes(bytes);
    if (bytes > 0) response->set_shared_memory_socket(options_.shared_memory_socket);
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

namespace {

void ToProto(const SequenceInfo& info, v1::SequenceInfo* out) {
  out->set_sequence_id(info.sequence_id);
  *out->mutable_profile() = info.profile;
  *out->mutable_config() = info.config;
  out->set_sealed(info.sealed);
  out->set_sealed_blocks(info.sealed_blocks);
  for (uint32_t blocks : info.blocks_per_layer) out->add_blocks_per_layer(blocks);
  out->set_bytes(info.bytes);
}

}  // namespace

grpc::ServerUnaryReactor* KvStoreService::ListSequences(grpc::CallbackServerContext* context,
                                                        const v1::ListSequencesRequest*,
                                                        v1::ListSequencesResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  // In-memory only (no store reads): cheap enough for gRPC's thread.
  for (const SequenceInfo& info : node_->ListSequences(*tenant)) {
    ToProto(info, response->add_sequences());
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* KvStoreService::DescribeSequence(
    grpc::CallbackServerContext* context, const v1::DescribeSequenceRequest* request,
    v1::DescribeSequenceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::optional<std::string> tenant = TenantOrFinish(context, reactor);
  if (!tenant) return reactor;
  pool_.Schedule([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<SequenceInfo> info = node_->DescribeSequence(tenant, request->sequence_id());
    if (info.ok()) ToProto(*info, response->mutable_sequence());
    reactor->Finish(ToGrpc(info.status()));
  });
  return reactor;
}

}  // namespace kvstar::server
