// BlockStore: where a storage node keeps offloaded KV blocks.
//
// A store holds sequences, each an opaque metadata record (the server keeps its serialized profile
// there) plus blocks addressed by (layer, block_index). Keys of sequences are opaque strings chosen
// by the caller (the server scopes them by tenant); they may contain any byte.
//
// Backends: RocksDB (embedded default), a POSIX/NFS directory, and a DRAM tier that caches either
// under a byte budget. Every implementation is thread-safe: any method may be called from any
// thread concurrently. Errors are values; no method throws. A failing device gives
// ResourceExhausted (no space) or Unavailable (an I/O error) naming the file; the store keeps
// serving, and a failed write may or may not have been applied, but only whole.
#ifndef KVSTAR_STORAGE_BLOCK_STORE_H_
#define KVSTAR_STORAGE_BLOCK_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvstar::storage {

// Names one block of a sequence. Ordered by (layer, block_index).
struct BlockId {
  uint32_t layer = 0;
  uint32_t block_index = 0;

  friend bool operator==(const BlockId& a, const BlockId& b) {
    return a.layer == b.layer && a.block_index == b.block_index;
  }
  friend bool operator!=(const BlockId& a, const BlockId& b) { return !(a == b); }
  friend bool operator<(const BlockId& a, const BlockId& b) {
    return a.layer != b.layer ? a.layer < b.layer : a.block_index < b.block_index;
  }
  template <typename H>
  friend H AbslHashValue(H h, const BlockId& id) {
    return H::combine(std::move(h), id.layer, id.block_index);
  }
};

// A block to write. The views must stay valid for the duration of the PutBlocks call.
struct BlockWrite {
  BlockId id;
  absl::string_view key;    // K bytes
  absl::string_view value;  // V bytes
  uint64_t checksum = 0;    // BlockChecksum(key, value); verified by the store before writing
};

// A block read back. checksum has been verified against the bytes.
struct BlockData {
  BlockId id;
  std::string key;
  std::string value;
  uint64_t checksum = 0;

  uint64_t size_bytes() const { return key.size() + value.size(); }
};

// A block read back and shared with whoever holds it: its bytes stay valid and unchanged while
// held, also after the store overwrote the block or dropped its sequence.
using SharedBlockData = std::shared_ptr<const BlockData>;

// Contents and counters of one tier, since the store was opened.
struct TierStats {
  std::string name;           // "dram", "rocksdb" or "nfs"
  uint64_t blocks = 0;        // blocks held now
  uint64_t bytes = 0;         // K+V bytes held now
  uint64_t budget_bytes = 0;  // 0 when unbounded
  uint64_t hits = 0;          // block reads served by this tier
  uint64_t misses = 0;        // block reads this tier could not serve
  uint64_t evictions = 0;     // blocks evicted to stay within budget
  // Block reads that found the stored bytes damaged (a checksum mismatch, the store's or the
  // backend's own) and answered DataLoss. Each is also logged (spdlog, error level).
  uint64_t corrupt_blocks = 0;
  // K+V bytes of dropped sequences whose disk space the tier has not given back yet: a backend
  // may reclaim a drop's space in the background after DropSequence returned (RocksDB does).
  uint64_t reclaim_pending_bytes = 0;
};

struct DropResult {
  uint64_t blocks = 0;
  uint64_t bytes = 0;
};

class BlockStore {
 public:
  virtual ~BlockStore() = default;

  // Creates or replaces the metadata record of a sequence. Durable on OK.
  // REQUIRES: !sequence_key.empty().
  virtual absl::Status PutSequence(absl::string_view sequence_key, absl::string_view metadata) = 0;

  // Returns the metadata record, or NotFound naming the sequence.
  virtual absl::StatusOr<std::string> GetSequence(absl::string_view sequence_key) = 0;

  // Keys of every stored sequence, sorted.
  virtual absl::StatusOr<std::vector<std::string>> ListSequences() = 0;

  // Writes blocks of one sequence, replacing blocks with the same id. The batch is applied whole
  // or not at all, and is durable (survives kill -9 and power loss) when OK is returned.
  // Fails with NotFound when the sequence has no metadata record, InvalidArgument naming the block
  // when a checksum does not match its bytes or when one id appears twice in the batch.
  virtual absl::Status PutBlocks(absl::string_view sequence_key,
                                 absl::Span<const BlockWrite> blocks) = 0;

  // Reads blocks in the order of `ids` into `out` (resized to ids.size()). Fails with NotFound
  // naming the first missing block (or the sequence), DataLoss naming the first block whose
  // stored bytes fail a checksum (logged, and counted in its tier's corrupt_blocks). On failure
  // `out` is unspecified.
  virtual absl::Status GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                 std::vector<BlockData>* out) = 0;

  // GetBlocks without copying where the store already holds the bytes in memory: the memory store
  // and the DRAM tier's hits hand out their own copies, shared. Same order, errors and counting as
  // GetBlocks. The default reads with GetBlocks and shares what it read (no copy either).
  virtual absl::Status ReadBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                  std::vector<SharedBlockData>* out);

  // Ids of every stored block of the sequence, sorted. NotFound for an unknown sequence.
  virtual absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view sequence_key) = 0;

  // Deletes the sequence's metadata and blocks durably: once OK is returned they never come back,
  // also after a crash, and the key may be used again at once (its new blocks are never touched by
  // the old sequence's cleanup). The disk space is released either before returning or soon after
  // in the background (Stats' reclaim_pending_bytes counts what is still held;
  // WaitForBackgroundWork waits for it). NotFound for an unknown sequence.
  virtual absl::StatusOr<DropResult> DropSequence(absl::string_view sequence_key) = 0;

  // Returns once the disk space of every sequence dropped before the call has been released, or
  // once releasing it failed for now (the store logs the error, retries later and finishes at the
  // next open at the latest). For tests and tools that measure disk usage; the store never needs
  // it. Thread-safe.
  virtual void WaitForBackgroundWork() {}

  // One entry per tier, front tier first.
  virtual std::vector<TierStats> Stats() = 0;
};

// XXH3-64 (seed 0) of key's bytes followed by value's bytes: the checksum blocks carry on the wire
// and on disk.
uint64_t BlockChecksum(absl::string_view key, absl::string_view value);

// Opens (creating if needed) a RocksDB store in `dir`. A write-ahead log damaged anywhere but in
// a torn last record (a write a crash cut short, never acknowledged) fails the open with
// DataLoss: replaying up to the damage would silently drop acknowledged writes after it.
absl::StatusOr<std::unique_ptr<BlockStore>> OpenRocksDbStore(const std::string& dir);

// Opens (creating if needed) a store in a POSIX directory, which may be an NFS mount shared by
// several nodes.
absl::StatusOr<std::unique_ptr<BlockStore>> OpenPosixDirStore(const std::string& dir);

// A store in process memory only: nothing survives the process. For ephemeral nodes, benchmarks
// and tests.
std::unique_ptr<BlockStore> NewMemoryStore();

// Puts a DRAM tier of at most `budget_bytes` of block bytes in front of `backend`. Writes go
// through to the backend before they are cached; reads are served from memory when present.
std::unique_ptr<BlockStore> NewDramTier(std::unique_ptr<BlockStore> backend, uint64_t budget_bytes);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_BLOCK_STORE_H_
