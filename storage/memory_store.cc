// MemoryStore: a BlockStore that keeps everything in process memory. Nothing survives the
// process; it is for ephemeral deployments (a node whose cache may be rebuilt from the engine),
// benchmarks and tests that must not measure a disk. Thread-safe under one mutex.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "storage/block_store.h"
#include "storage/store_util.h"

namespace kvstar::storage {
namespace {

class MemoryStore final : public BlockStore {
 public:
  absl::Status PutSequence(absl::string_view sequence_key, absl::string_view metadata) override {
    if (sequence_key.empty()) return absl::InvalidArgumentError("sequence key is empty");
    absl::MutexLock lock(&mu_);
    sequences_[std::string(sequence_key)].metadata = std::string(metadata);
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> GetSequence(absl::string_view sequence_key) override {
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(std::string(sequence_key));
    if (found == sequences_.end()) return SequenceNotFound(sequence_key);
    return found->second.metadata;
  }

  absl::StatusOr<std::vector<std::string>> ListSequences() override {
    absl::MutexLock lock(&mu_);
    return SortedSequenceKeys(sequences_);
  }

  absl::Status PutBlocks(absl::string_view sequence_key,
                         absl::Span<const BlockWrite> blocks) override {
    if (auto s = ValidateBlockWrites(sequence_key, blocks); !s.ok()) return s;
    // Copy outside the lock; publish under it.
    std::vector<std::shared_ptr<const BlockData>> copies;
    copies.reserve(blocks.size());
    for (const BlockWrite& write : blocks) {
      copies.push_back(std::make_shared<const BlockData>(
          BlockData{write.id, std::string(write.key), std::string(write.value), write.checksum}));
    }
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(std::string(sequence_key));
    if (found == sequences_.end()) return SequenceNotFound(sequence_key);
    Sequence& sequence = found->second;
    for (auto& block : copies) {
      auto [it, inserted] = sequence.blocks.try_emplace(block->id, nullptr);
      if (!inserted) sequence.bytes -= it->second->size_bytes();
      sequence.bytes += block->size_bytes();
      it->second = std::move(block);
    }
    return absl::OkStatus();
  }

  absl::Status GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                         std::vector<BlockData>* out) override {
    return CopySharedBlocks(*this, sequence_key, ids, out);
  }

  // The stored blocks themselves: they are immutable once published, and a PutBlocks that
  // replaces one publishes a new copy.
  absl::Status ReadBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                          std::vector<SharedBlockData>* out) override {
    out->clear();
    out->reserve(ids.size());
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(std::string(sequence_key));
    if (found == sequences_.end()) return SequenceNotFound(sequence_key);
    for (const BlockId& id : ids) {
      auto block = found->second.blocks.find(id);
      if (block == found->second.blocks.end()) return BlockNotFound(sequence_key, id);
      out->push_back(block->second);
    }
    hits_ += ids.size();
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view sequence_key) override {
    absl::MutexLock lock(&mu_);
    return SortedBlockIds(sequences_, sequence_key);
  }

  absl::StatusOr<DropResult> DropSequence(absl::string_view sequence_key) override {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<DropResult> dropped = DropTotals(sequences_, sequence_key);
    if (dropped.ok()) sequences_.erase(std::string(sequence_key));
    return dropped;
  }

  std::vector<TierStats> Stats() override {
    absl::MutexLock lock(&mu_);
    TierStats stats = CatalogStats("memory", sequences_);
    stats.hits = hits_;
    return {stats};
  }

 private:
  struct Sequence {
    std::string metadata;
    std::map<BlockId, SharedBlockData> blocks;
    uint64_t bytes = 0;
  };

  absl::Mutex mu_;
  std::map<std::string, Sequence> sequences_ ABSL_GUARDED_BY(mu_);
  uint64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

std::unique_ptr<BlockStore> NewMemoryStore() { return std::make_unique<MemoryStore>(); }

}  // namespace kvstar::storage
