// KvStoreService: the gRPC edge of a storage node, on gRPC's callback API. It translates
// kvstar.v1 messages to StorageNode calls (server/storage_node.h) and their results back, maps
// absl::Status to gRPC status codes, authenticates callers, and bounds what the node admits
// (server/load_limits.h).
//
// No call holds a thread while it waits for its client: streams are reactors, and the work of a
// call (store I/O, scoring) runs on the service's WorkPool, never on gRPC's threads. A stream
// whose client sends nothing (PutBlocks) or reads nothing (Retrieve, GetBlocks) for
// stream_idle_timeout_ms is ended with DEADLINE_EXCEEDED (PutBlocks) or cancelled.
//
// PutBlocks is registered raw (its messages arrive as bytes, parsed by the service): gRPC's
// callback API reports a message it cannot decode like the client's half-close, and a stream
// must not end OK, its earlier messages stored, when its last message was garbage.
//
// Thread-safe: gRPC calls every method from its own threads concurrently.
#ifndef KVSTAR_SERVER_KVSTORE_SERVICE_H_
#define KVSTAR_SERVER_KVSTORE_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/support/byte_buffer.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "server/load_limits.h"
#include "server/storage_node.h"
#include "server/tenant_segments.h"
#include "server/token_auth.h"
#include "server/work_pool.h"
#include "storage/block_store.h"

namespace kvstar::server {

struct ServiceOptions {
  // Block bytes per streamed reply (GetBlocks, Retrieve); a reply always carries at least one
  // block. 3 MiB keeps replies under gRPC's default 4 MiB receive limit, so stock clients
  // (grpcurl, Python) can read them.
  uint64_t max_reply_bytes = 3 << 20;
  // Threads that score retrievals; 0 means one per hardware thread.
  size_t retrieval_threads = 0;
  // Threads that copy retrieved blocks into shared memory (NodeOptions::copy_threads).
  size_t copy_threads = 0;
  // Keep put blocks in their tenant's segment too (NodeOptions::segment_resident_blocks).
  bool segment_resident_blocks = false;
  // Threads that run calls' work (store I/O, scoring); 0 means max(16, 4 x hardware threads).
  size_t worker_threads = 0;
  // A stream that makes no progress this long is ended; 0: never.
  uint64_t stream_idle_timeout_ms = 30000;
  LoadLimitsOptions limits;
  // Each tenant's segment for its co-located clients' shared_memory replies; null: none (bytes
  // in replies). Not owned; must outlive the service.
  TenantSegments* shared_memory = nullptr;
  // Where clients receive their tenant's segment (SegmentHandoff::address), advertised in
  // GetServerInfo; empty with no shared memory.
  std::string shared_memory_socket;
  // Bearer tokens -> tenants; null: no authentication, every caller is tenant "default".
  // Not owned; must outlive the service.
  const TokenAuth* auth = nullptr;
  // With auth: the tenant whose tokens see the whole node's Stats; empty: none does.
  std::string admin_tenant;
};

// Every method on the callback API; PutBlocks on its raw form (ByteBuffer messages), whose
// registration replaces the typed one. Stacked on the generated CallbackService so that a method
// added to the proto is registered without an edit here (clang's -Woverloaded-virtual notes that
// the raw PutBlocks hides the typed one, which nothing calls).
using KvStoreCallbackBase =
    v1::KvStore::WithRawCallbackMethod_PutBlocks<v1::KvStore::CallbackService>;

class KvStoreService final : public KvStoreCallbackBase {
 public:
  // Loads every stored sequence's profile from `store`, which must outlive the service.
  static absl::StatusOr<std::unique_ptr<KvStoreService>> Create(storage::BlockStore* store,
                                                                ServiceOptions options);
  // Stops the idle-stream watchdog and runs the queued work. Destroy the grpc::Server first.
  ~KvStoreService() override;

  // Where the service reports whether it can take work (NOT_SERVING while a total limit of
  // LoadLimits is reached), for the service names given. Not owned; null stops reporting.
  void SetHealthCheckService(grpc::HealthCheckServiceInterface* health);

  // The kvstar methods registered raw: interceptors see their messages as grpc::ByteBuffer,
  // not as protobuf messages.
  static std::vector<std::string> RawMethods() { return {"PutBlocks"}; }

  // The core the service translates for (metrics read its counters).
  StorageNode& node() { return *node_; }

  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* context,
                                           const v1::CreateSequenceRequest* request,
                                           v1::CreateSequenceResponse* response) override;
  // Raw: each message is a serialized v1::PutBlocksRequest, the response a serialized
  // v1::PutBlocksResponse. A message that does not parse ends the stream with INVALID_ARGUMENT.
  grpc::ServerReadReactor<grpc::ByteBuffer>* PutBlocks(grpc::CallbackServerContext* context,
                                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Seal(grpc::CallbackServerContext* context,
                                 const v1::SealRequest* request,
                                 v1::SealResponse* response) override;
  grpc::ServerWriteReactor<v1::RetrieveResponse>* Retrieve(
      grpc::CallbackServerContext* context, const v1::RetrieveRequest* request) override;
  grpc::ServerWriteReactor<v1::GetBlocksResponse>* GetBlocks(
      grpc::CallbackServerContext* context, const v1::GetBlocksRequest* request) override;
  grpc::ServerUnaryReactor* DropSequence(grpc::CallbackServerContext* context,
                                         const v1::DropSequenceRequest* request,
                                         v1::DropSequenceResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::ServerInfoRequest* request,
                                          v1::ServerInfoResponse* response) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* context,
                                          const v1::ListSequencesRequest* request,
                                          v1::ListSequencesResponse* response) override;
  grpc::ServerUnaryReactor* DescribeSequence(grpc::CallbackServerContext* context,
                                             const v1::DescribeSequenceRequest* request,
                                             v1::DescribeSequenceResponse* response) override;

  // A stream the watchdog may end for idleness. Defined in kvstore_service.cc.
  class Stream;

 private:
  class PutReactor;
  template <typename Response>
  class WriteReactor;

  KvStoreService(std::unique_ptr<StorageNode> node, ServiceOptions options);

  // The caller's tenant (from its bearer token), or UNAUTHENTICATED.
  absl::StatusOr<std::string> Tenant(const grpc::CallbackServerContext* context) const;
  // The same for unary calls: on failure finishes `reactor` with the error and returns nullopt.
  std::optional<std::string> TenantOrFinish(const grpc::CallbackServerContext* context,
                                            grpc::ServerUnaryReactor* reactor) const;
  void Register(std::shared_ptr<Stream> stream) ABSL_LOCKS_EXCLUDED(streams_mu_);
  // Forgets the stream; it is destroyed once no watchdog pass holds it.
  void Unregister(Stream* stream) ABSL_LOCKS_EXCLUDED(streams_mu_);
  void WatchIdleStreams() ABSL_LOCKS_EXCLUDED(streams_mu_);
  void ReportServing(bool serving);

  const ServiceOptions options_;
  const std::unique_ptr<StorageNode> node_;
  LoadLimits limits_;
  std::string host_id_;  // the kernel's boot id
  std::atomic<grpc::HealthCheckServiceInterface*> health_{nullptr};

  absl::Mutex streams_mu_;
  absl::flat_hash_map<Stream*, std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(streams_mu_);
  bool stopping_ ABSL_GUARDED_BY(streams_mu_) = false;
  std::thread watchdog_;
  // Last members: destroyed (their queues run, their threads joined) before the rest.
  WorkPool drop_pool_;  // DropSequence only
  WorkPool pool_;       // every other call's work
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_KVSTORE_SERVICE_H_
