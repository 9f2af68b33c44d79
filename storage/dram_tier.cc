#include "storage/dram_tier.h"

#include <utility>

#include "storage/store_util.h"

namespace kvstar::storage {

DramTier::DramTier(std::unique_ptr<BlockStore> backend, uint64_t budget_bytes)
    : backend_(std::move(backend)), budget_bytes_(budget_bytes) {}

absl::Status DramTier::PutSequence(absl::string_view sequence_key, absl::string_view metadata) {
  return backend_->PutSequence(sequence_key, metadata);
}

absl::StatusOr<std::string> DramTier::GetSequence(absl::string_view sequence_key) {
  return backend_->GetSequence(sequence_key);
}

absl::StatusOr<std::vector<std::string>> DramTier::ListSequences() {
  return backend_->ListSequences();
}

absl::StatusOr<std::vector<BlockId>> DramTier::ListBlocks(absl::string_view sequence_key) {
  return backend_->ListBlocks(sequence_key);
}

absl::Status DramTier::PutBlocks(absl::string_view sequence_key,
                                 absl::Span<const BlockWrite> blocks) {
  const absl::Status status = backend_->PutBlocks(sequence_key, blocks);
  // Copy outside the lock; blocks over budget are not copied at all.
  std::vector<SharedBlockData> copies;
  if (status.ok()) {
    copies.reserve(blocks.size());
    for (const BlockWrite& write : blocks) {
      if (write.key.size() + write.value.size() > budget_bytes_) continue;
      auto block = std::make_shared<BlockData>();
      block->id = write.id;
      block->key.assign(write.key.data(), write.key.size());
      block->value.assign(write.value.data(), write.value.size());
      block->checksum = write.checksum;
      copies.push_back(std::move(block));
    }
  }
  absl::MutexLock lock(&mu_);
  last_write_[std::string(sequence_key)] = ++write_clock_;
  // Forget every block of the batch first: on failure the backend's state is unknown, and on
  // success an oversized block must not leave its old copy behind.
  for (const BlockWrite& write : blocks) EraseLocked(sequence_key, write.id);
  for (auto& block : copies) InsertLocked(sequence_key, std::move(block));
  return status;
}

absl::Status DramTier::GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                 std::vector<BlockData>* out) {
  return CopySharedBlocks(*this, sequence_key, ids, out);
}

absl::Status DramTier::ReadBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                  std::vector<SharedBlockData>* out) {
  if (ids.empty()) return backend_->ReadBlocks(sequence_key, ids, out);
  out->assign(ids.size(), nullptr);
  std::vector<BlockId> missing_ids;
  std::vector<size_t> missing_positions;
  uint64_t read_started = 0;
  {
    absl::MutexLock lock(&mu_);
    read_started = write_clock_;
    auto sequence = index_.find(sequence_key);
    for (size_t i = 0; i < ids.size(); ++i) {
      if (sequence != index_.end()) {
        auto found = sequence->second.find(ids[i]);
        if (found != sequence->second.end()) {
          lru_.splice(lru_.begin(), lru_, found->second);
          (*out)[i] = found->second->block;
          ++hits_;
          continue;
        }
      }
      ++misses_;
      missing_ids.push_back(ids[i]);
      missing_positions.push_back(i);
    }
  }
  if (missing_ids.empty()) return absl::OkStatus();

  std::vector<SharedBlockData> fetched;
  if (absl::Status status = backend_->ReadBlocks(sequence_key, missing_ids, &fetched);
      !status.ok()) {
    return status;
  }
  std::vector<SharedBlockData> to_cache;
  for (size_t j = 0; j < fetched.size(); ++j) {
    if (fetched[j]->size_bytes() <= budget_bytes_) to_cache.push_back(fetched[j]);
    (*out)[missing_positions[j]] = std::move(fetched[j]);
  }
  if (!to_cache.empty()) {
    absl::MutexLock lock(&mu_);
    if (LastChangeLocked(sequence_key) <= read_started) {
      for (auto& block : to_cache) InsertLocked(sequence_key, std::move(block));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DropResult> DramTier::DropSequence(absl::string_view sequence_key) {
  absl::StatusOr<DropResult> result = backend_->DropSequence(sequence_key);
  // The cached copies are freed once the lock is released: a big sequence is thousands of blocks,
  // and every read and write of every sequence needs mu_.
  LruList dropped;
  absl::MutexLock lock(&mu_);
  last_write_.erase(sequence_key);
  last_drop_ = ++write_clock_;
  auto sequence = index_.find(sequence_key);
  if (sequence != index_.end()) {
    for (const auto& [id, entry] : sequence->second) {
      bytes_ -= entry->block->size_bytes();
      dropped.splice(dropped.end(), lru_, entry);
    }
    index_.erase(sequence);
  }
  return result;
}

std::vector<TierStats> DramTier::Stats() {
  std::vector<TierStats> stats(1);
  {
    absl::MutexLock lock(&mu_);
    TierStats& dram = stats.front();
    dram.name = "dram";
    dram.blocks = lru_.size();
    dram.bytes = bytes_;
    dram.budget_bytes = budget_bytes_;
    dram.hits = hits_;
    dram.misses = misses_;
    dram.evictions = evictions_;
  }
  std::vector<TierStats> backend = backend_->Stats();
  stats.insert(stats.end(), backend.begin(), backend.end());
  return stats;
}

void DramTier::InsertLocked(absl::string_view sequence_key,
                            std::shared_ptr<const BlockData> block) {
  const BlockId id = block->id;
  EraseLocked(sequence_key, id);
  if (block->size_bytes() > budget_bytes_) return;
  bytes_ += block->size_bytes();
  lru_.push_front(Entry{std::string(sequence_key), std::move(block)});
  index_[std::string(sequence_key)][id] = lru_.begin();
  while (bytes_ > budget_bytes_) {
    const std::string victim_key = lru_.back().sequence_key;
    EraseLocked(victim_key, lru_.back().block->id);
    ++evictions_;
  }
}

void DramTier::EraseLocked(absl::string_view sequence_key, BlockId id) {
  auto sequence = index_.find(sequence_key);
  if (sequence == index_.end()) return;
  auto found = sequence->second.find(id);
  if (found == sequence->second.end()) return;
  bytes_ -= found->second->block->size_bytes();
  lru_.erase(found->second);
  sequence->second.erase(found);
  if (sequence->second.empty()) index_.erase(sequence);
}

uint64_t DramTier::LastChangeLocked(absl::string_view sequence_key) const {
  auto found = last_write_.find(sequence_key);
  return found != last_write_.end() ? found->second : last_drop_;
}

std::unique_ptr<BlockStore> NewDramTier(std::unique_ptr<BlockStore> backend,
                                        uint64_t budget_bytes) {
  return std::make_unique<DramTier>(std::move(backend), budget_bytes);
}

}  // namespace kvstar::storage
