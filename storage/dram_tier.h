// DramTier: an LRU cache of blocks in memory in front of another BlockStore (NewDramTier in
// block_store.h builds one).
//
// - Bounded by budget_bytes of K+V bytes; a block larger than the budget is never cached, and a
//   budget of 0 makes the tier a pass-through that only counts misses.
// - Write-through: PutBlocks writes the backend first and caches the blocks only once the backend
//   acknowledged them, so the cache never holds a block the backend lacks.
// - GetBlocks and ReadBlocks serve hits from memory (ReadBlocks without copying them) and fetch
//   every miss in ONE backend ReadBlocks call, then cache what they fetched unless a write or drop
//   of that sequence raced with the fetch.
// - Sequence metadata and ListBlocks are not cached: they go to the backend.
// Thread-safe; the lock is never held across a backend call.
#ifndef KVSTAR_STORAGE_DRAM_TIER_H_
#define KVSTAR_STORAGE_DRAM_TIER_H_

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "storage/block_store.h"

namespace kvstar::storage {

class DramTier final : public BlockStore {
 public:
  DramTier(std::unique_ptr<BlockStore> backend, uint64_t budget_bytes);

  absl::Status PutSequence(absl::string_view sequence_key, absl::string_view metadata) override;
  absl::StatusOr<std::string> GetSequence(absl::string_view sequence_key) override;
  absl::StatusOr<std::vector<std::string>> ListSequences() override;
  absl::Status PutBlocks(absl::string_view sequence_key,
                         absl::Span<const BlockWrite> blocks) override;
  absl::Status GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                         std::vector<BlockData>* out) override;
  absl::Status ReadBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                          std::vector<SharedBlockData>* out) override;
  absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view sequence_key) override;
  absl::StatusOr<DropResult> DropSequence(absl::string_view sequence_key) override;
  void WaitForBackgroundWork() override { backend_->WaitForBackgroundWork(); }
  // The DRAM tier's counters ("dram"), then the backend's tiers.
  std::vector<TierStats> Stats() override;

 private:
  struct Entry {
    std::string sequence_key;
    std::shared_ptr<const BlockData> block;
  };
  using LruList = std::list<Entry>;  // most recently used first

  // Makes `block` the cached copy of its id, evicting least recently used blocks to stay within
  // budget; a block too large to cache only removes the old copy.
  void InsertLocked(absl::string_view sequence_key, std::shared_ptr<const BlockData> block)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseLocked(absl::string_view sequence_key, BlockId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The write clock value of the last write or drop that may have changed the sequence's blocks.
  uint64_t LastChangeLocked(absl::string_view sequence_key) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::unique_ptr<BlockStore> backend_;
  const uint64_t budget_bytes_;

  absl::Mutex mu_;
  LruList lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, absl::flat_hash_map<BlockId, LruList::iterator>> index_
      ABSL_GUARDED_BY(mu_);
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  // A read caches what it fetched only if no write or drop of the sequence completed since the
  // read began: otherwise the fetched copy may be older than the one the writer cached.
  uint64_t write_clock_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, uint64_t> last_write_ ABSL_GUARDED_BY(mu_);
  uint64_t last_drop_ ABSL_GUARDED_BY(mu_) = 0;  // stands for sequences absent from last_write_
};

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_DRAM_TIER_H_
