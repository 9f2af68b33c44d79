// kvstar::Admin: what an operator asks a storage node — its health, its counters, the caller's
// sequences, one sequence in detail — and dropping a sequence. kvstarctl is built on it.
// Uses the ClientOptions of client.h (address, TLS, bearer token, rpc_timeout_ms); no device
// backend, no slots. Thread-safe: calls may come from any thread.
#ifndef KVSTAR_CLIENT_INCLUDE_KVSTAR_ADMIN_H_
#define KVSTAR_CLIENT_INCLUDE_KVSTAR_ADMIN_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstar/client.h"

namespace kvstar {

struct TierInfo {
  std::string name;  // "dram", "rocksdb", "nfs" or "memory"
  uint64_t blocks = 0;
  uint64_t bytes = 0;
  uint64_t budget_bytes = 0;  // 0: unbounded
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  // K+V bytes of dropped sequences whose disk space the tier has not released yet (RocksDB
  // compacts a dropped range in the background after DropSequence answered); 0 once done.
  uint64_t reclaim_pending_bytes = 0;
};

// The node's Stats. scope "node": the whole node (an admin, or no authentication), tiers
// included; "tenant": the caller's sequences and calls only, no tiers.
struct NodeStatsInfo {
  std::string scope;
  uint64_t sequences = 0;
  std::vector<TierInfo> tiers;
  uint64_t blocks_put = 0;
  uint64_t blocks_got = 0;
  uint64_t retrievals = 0;
  uint64_t blocks_scored = 0;
  uint64_t blocks_sent = 0;
  uint64_t blocks_skipped_held = 0;
  uint64_t blocks_sent_shared = 0;
  uint64_t corrupt_blocks = 0;
  // Retrieve calls' wall time by phase, summed (microseconds; StatsResponse says what each is).
  uint64_t retrieve_micros = 0;
  uint64_t retrieve_score_micros = 0;
  uint64_t retrieve_wait_micros = 0;
  uint64_t retrieve_read_micros = 0;
  uint64_t retrieve_copy_micros = 0;
  uint64_t retrieve_send_micros = 0;
};

struct SequenceDescription {
  std::string sequence_id;
  ModelProfile profile;
  KvstarConfig config;
  bool sealed = false;
  uint32_t sealed_blocks = 0;  // per layer, in the representations
  // DescribeSequence only (empty and 0 from ListSequences).
  std::vector<uint32_t> blocks_per_layer;
  uint64_t bytes = 0;
};

class Admin {
 public:
  // Makes the channel; fails only for bad options (the node is reached at the first call).
  static absl::StatusOr<std::unique_ptr<Admin>> Connect(const ClientOptions& options);
  virtual ~Admin() = default;

  // The gRPC health service's answer for kvstar.v1.KvStore: "SERVING" or "NOT_SERVING";
  // UNAVAILABLE when the node cannot be reached.
  virtual absl::StatusOr<std::string> Health() = 0;
  virtual absl::StatusOr<NodeStatsInfo> Stats() = 0;
  // The caller's tenant's sequences, sorted by id.
  virtual absl::StatusOr<std::vector<SequenceDescription>> ListSequences() = 0;
  // NOT_FOUND for an id the caller's tenant does not hold.
  virtual absl::StatusOr<SequenceDescription> DescribeSequence(const std::string& sequence_id) = 0;
  // Deletes the sequence and its blocks; returns the blocks dropped.
  virtual absl::StatusOr<uint64_t> DropSequence(const std::string& sequence_id) = 0;
};

}  // namespace kvstar

#endif  // KVSTAR_CLIENT_INCLUDE_KVSTAR_ADMIN_H_
