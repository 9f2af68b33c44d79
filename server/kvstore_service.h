// KvStoreService: the gRPC edge of a storage node. It translates kvstar.v1 messages to storage
// and retrieval calls, validates every request before anything is stored, and maps absl::Status
// to gRPC status codes. The algorithm lives in retrieval/, the bytes in storage/.
//
// Thread-safe: gRPC calls every handler from its worker threads concurrently.
#ifndef KVSTAR_SERVER_KVSTORE_SERVICE_H_
#define KVSTAR_SERVER_KVSTORE_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "retrieval/representation.h"
#include "retrieval/retriever.h"
#include "server/shared_memory_arena.h"
#include "server/token_auth.h"
#include "storage/block_store.h"

namespace kvstar::server {

struct ServiceOptions {
  // Block bytes per streamed reply (GetBlocks, Retrieve); a reply always carries at least one
  // block. 3 MiB keeps replies under gRPC's default 4 MiB receive limit, so stock clients
  // (grpcurl, Python) can read them.
  uint64_t max_reply_bytes = 3 << 20;
  // Threads that score retrievals; 0 means one per hardware thread.
  size_t retrieval_threads = 0;
  // Segment for co-located clients' shared_memory replies; null: none (bytes in replies).
  // Not owned; must outlive the service.
  SharedMemoryArena* shared_memory = nullptr;
  // Bearer tokens -> tenants; null: no authentication, every caller is tenant "default".
  // Not owned; must outlive the service.
  const TokenAuth* auth = nullptr;
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
  // Builds the sequence's representations from its stored blocks (every layer must hold blocks
  // 0..n-1, the same n) and returns the first selection. Sealing again rebuilds them.
  grpc::Status Seal(grpc::ServerContext* context, const v1::SealRequest* request,
                    v1::SealResponse* response) override;
  // Blocks stored after Seal (decode-generated) join the representations before scoring.
  // Representations live in memory: after a restart, Retrieve answers FAILED_PRECONDITION until
  // the client seals the sequence again.
  grpc::Status Retrieve(grpc::ServerContext* context, const v1::RetrieveRequest* request,
                        grpc::ServerWriter<v1::RetrieveResponse>* writer) override;
  grpc::Status GetBlocks(grpc::ServerContext* context, const v1::GetBlocksRequest* request,
                         grpc::ServerWriter<v1::GetBlocksResponse>* writer) override;
  grpc::Status DropSequence(grpc::ServerContext* context, const v1::DropSequenceRequest* request,
                            v1::DropSequenceResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;
  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::ServerInfoRequest* request,
                             v1::ServerInfoResponse* response) override;

 private:
  // One stored sequence. profile and config never change after creation; the retrieval state is
  // guarded by the sequence's own mutex so retrievals of different sequences never contend.
  struct Sequence {
    // From the metadata record the store keeps (CreateSequence writes it, Create reads it back).
    Sequence(std::string store_key, const v1::CreateSequenceRequest& record)
        : key(std::move(store_key)),
          id(record.sequence_id()),
          profile(record.profile()),
          config(record.config()) {}

    const std::string key;  // "<tenant>/<id>", the store's key
    const std::string id;
    const v1::ModelProfile profile;
    const v1::KvstarConfig config;

    absl::Mutex mu;
    // Built by Seal; null before.
    std::unique_ptr<retrieval::SequenceIndex> index ABSL_GUARDED_BY(mu);
    // Decode step of the last accepted Retrieve; steps must not go backwards.
    uint64_t last_decode_step ABSL_GUARDED_BY(mu) = 0;
    // Shared-memory regions of the last Retrieve's replies; freed by the next one or by Drop.
    std::vector<uint64_t> shared_regions ABSL_GUARDED_BY(mu);
  };

  KvStoreService(storage::BlockStore* store, ServiceOptions options);

  // The caller's tenant (from its bearer token), or UNAUTHENTICATED.
  absl::StatusOr<std::string> Tenant(const grpc::ServerContext* context) const;
  absl::StatusOr<std::shared_ptr<Sequence>> Find(absl::string_view tenant,
                                                 absl::string_view sequence_id) const
      ABSL_LOCKS_EXCLUDED(mu_);
  struct PendingPut;
  // Validates one PutBlocks message (sequence, shapes, checksums) without storing anything.
  absl::Status CheckMessage(absl::string_view tenant, const v1::PutBlocksRequest& message);
  // Writes the pending messages as one durable store batch and clears them.
  absl::Status FlushPut(PendingPut& pending, v1::PutBlocksResponse* response);
  // Appends stored blocks beyond what the index holds (decode-generated blocks) to the index.
  absl::Status CatchUp(const std::string& key, Sequence& sequence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sequence.mu);
  // Checks and orders one request's queries by layer: every layer exactly once, same count.
  absl::StatusOr<retrieval::RetrievalRequest> ToRetrievalRequest(
      const Sequence& sequence, const retrieval::SequenceIndex* index,
      const google::protobuf::RepeatedPtrField<v1::LayerQueries>& queries, uint32_t max_queries,
      absl::string_view where) const;

  // Reads `ids` in batches of at most max_reply_bytes and hands each batch to `consume`.
  absl::Status ForEachBlockBatch(
      const std::string& key, absl::Span<const storage::BlockId> ids, uint64_t block_bytes,
      const std::function<absl::Status(std::vector<storage::BlockData>&)>& consume);
  // Writes the replies of one scored layer: its selection and the selected blocks not held.
  // `shared_regions` (the sequence's, its lock held) collects the regions it fills.
  absl::Status WriteLayer(const v1::SequenceQueries& part, const Sequence& sequence, uint32_t layer,
                          const std::vector<uint32_t>& selected,
                          const absl::flat_hash_set<uint32_t>& held,
                          std::vector<uint64_t>* shared_regions,
                          grpc::ServerWriter<v1::RetrieveResponse>* writer);
  void FreeSharedRegions(Sequence& sequence) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sequence.mu);

  storage::BlockStore* const store_;
  const ServiceOptions options_;
  retrieval::Retriever retriever_;

  mutable absl::Mutex mu_;
  // Sequence key (tenant-scoped id) -> sequence.
  absl::flat_hash_map<std::string, std::shared_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);

  std::atomic<uint64_t> blocks_put_{0};
  std::atomic<uint64_t> blocks_got_{0};
  std::atomic<uint64_t> retrievals_{0};
  std::atomic<uint64_t> blocks_scored_{0};
  std::atomic<uint64_t> blocks_sent_{0};
  std::atomic<uint64_t> blocks_skipped_held_{0};
  std::atomic<uint64_t> blocks_sent_shared_{0};
  std::string host_id_;  // the kernel's boot id
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_KVSTORE_SERVICE_H_
