// KvStoreService: the gRPC edge of a storage node. It translates kvstar.v1 messages to storage
// calls, validates every request before anything is stored, and maps absl::Status to gRPC status
// codes. It holds no algorithm of its own.
//
// Thread-safe: gRPC calls every handler from its worker threads concurrently.
#ifndef KVSTAR_SERVER_KVSTORE_SERVICE_H_
#define KVSTAR_SERVER_KVSTORE_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "storage/block_store.h"

namespace kvstar::server {

struct ServiceOptions {
  // Upper bound on the bytes of one streamed reply (GetBlocks); keep under the channel's limit.
  uint64_t max_reply_bytes = 4 << 20;
};

class KvStoreService final : public v1::KvStore::Service {
 public:
  // Loads every stored sequence's profile from `store`, which must outlive the service.
  static absl::StatusOr<std::unique_ptr<KvStoreService>> Create(storage::BlockStore* store,
                                                                 ServiceOptions options);

  grpc::Status CreateSequence(grpc::ServerContext* context,
                              const v1::CreateSequenceRequest* request,
                              v1::CreateSequenceResponse* response) override;
  grpc::Status PutBlocks(grpc::ServerContext* context,
                         grpc::ServerReader<v1::PutBlocksRequest>* reader,
                         v1::PutBlocksResponse* response) override;
  grpc::Status Seal(grpc::ServerContext* context, const v1::SealRequest* request,
                    v1::SealResponse* response) override;
  grpc::Status Retrieve(grpc::ServerContext* context, const v1::RetrieveRequest* request,
                        grpc::ServerWriter<v1::RetrieveResponse>* writer) override;
  grpc::Status GetBlocks(grpc::ServerContext* context, const v1::GetBlocksRequest* request,
                         grpc::ServerWriter<v1::GetBlocksResponse>* writer) override;
  grpc::Status DropSequence(grpc::ServerContext* context, const v1::DropSequenceRequest* request,
                            v1::DropSequenceResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;

 private:
  // What the service remembers of a sequence; stored in the BlockStore's metadata record as a
  // serialized CreateSequenceRequest (id, normalized profile and config).
  struct Sequence {
    v1::ModelProfile profile;
    v1::KvstarConfig config;
  };

  KvStoreService(storage::BlockStore* store, ServiceOptions options)
      : store_(store), options_(options) {}

  absl::StatusOr<Sequence> Find(const std::string& key) const ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status PutMessage(const v1::PutBlocksRequest& message, v1::PutBlocksResponse* response);

  storage::BlockStore* const store_;
  const ServiceOptions options_;

  mutable absl::Mutex mu_;
  // Sequence key (tenant-scoped id) -> profile and knobs.
  absl::flat_hash_map<std::string, Sequence> sequences_ ABSL_GUARDED_BY(mu_);

  std::atomic<uint64_t> blocks_put_{0};
  std::atomic<uint64_t> blocks_got_{0};
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_KVSTORE_SERVICE_H_
