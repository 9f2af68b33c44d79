// Helpers shared by the BlockStore backends: batch validation, error messages that name blocks,
// and fixed-width integer encoding. Internal to //storage.
#ifndef KVSTAR_STORAGE_STORE_UTIL_H_
#define KVSTAR_STORAGE_STORE_UTIL_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "storage/block_store.h"
#include "storage/log_value.h"

namespace kvstar::storage {

// "sequence \"<escaped key>\"": sequence keys may hold any byte, so messages escape them.
std::string DescribeSequence(absl::string_view sequence_key);

// "block (layer L, index I) of sequence \"<escaped key>\"".
std::string DescribeBlock(absl::string_view sequence_key, BlockId id);

absl::Status SequenceNotFound(absl::string_view sequence_key);
absl::Status BlockNotFound(absl::string_view sequence_key, BlockId id);

// InvalidArgument naming the first block whose checksum does not match its bytes or whose id
// appears twice; OK otherwise. Every backend runs this before writing anything.
absl::Status ValidateBlockWrites(absl::string_view sequence_key,
                                 absl::Span<const BlockWrite> blocks);

// DataLoss naming the block unless `checksum` matches BlockChecksum(key, value).
absl::Status VerifyStoredBlock(absl::string_view sequence_key, BlockId id, absl::string_view key,
                               absl::string_view value, uint64_t checksum);

// For a block read that failed with DataLoss: logs one line (spdlog, error level) naming the
// tier, the escaped sequence key and the block, and adds one to `corrupt_blocks`.
void ReportCorruptBlock(absl::string_view tier, absl::string_view sequence_key, BlockId id,
                        const absl::Status& status, std::atomic<uint64_t>* corrupt_blocks);

// GetBlocks of a store whose ReadBlocks shares its own in-memory copies: reads them shared and
// copies each into `out` (the reverse of BlockStore::ReadBlocks' default).
absl::Status CopySharedBlocks(BlockStore& store, absl::string_view sequence_key,
                              absl::Span<const BlockId> ids, std::vector<BlockData>* out);

// Big-endian: keys that must sort numerically as bytes (RocksDB).
void AppendBigEndian32(uint32_t v, std::string* out);
uint32_t ReadBigEndian32(const char* p);

// Little-endian: on-disk headers and indices.
void AppendLittleEndian32(uint32_t v, std::string* out);
void AppendLittleEndian64(uint64_t v, std::string* out);
uint32_t ReadLittleEndian32(const char* p);
uint64_t ReadLittleEndian64(const char* p);

// Queries over the in-memory catalog both on-disk stores keep: a sorted map from sequence key
// to a record with `blocks` (a std::map keyed by BlockId) and `bytes` (K+V bytes of its blocks).
template <typename Sequence>
std::vector<std::string> SortedSequenceKeys(const std::map<std::string, Sequence>& sequences) {
  std::vector<std::string> keys;
  keys.reserve(sequences.size());
  for (const auto& entry : sequences) keys.push_back(entry.first);
  return keys;
}

template <typename Sequence>
absl::StatusOr<std::vector<BlockId>> SortedBlockIds(
    const std::map<std::string, Sequence>& sequences, absl::string_view sequence_key) {
  auto found = sequences.find(std::string(sequence_key));
  if (found == sequences.end()) return SequenceNotFound(sequence_key);
  std::vector<BlockId> ids;
  ids.reserve(found->second.blocks.size());
  for (const auto& entry : found->second.blocks) ids.push_back(entry.first);
  return ids;
}

// What dropping the sequence releases, or NotFound.
template <typename Sequence>
absl::StatusOr<DropResult> DropTotals(const std::map<std::string, Sequence>& sequences,
                                      absl::string_view sequence_key) {
  auto found = sequences.find(std::string(sequence_key));
  if (found == sequences.end()) return SequenceNotFound(sequence_key);
  return DropResult{found->second.blocks.size(), found->second.bytes};
}

// Blocks and bytes summed over every sequence; the caller fills in the rest.
template <typename Sequence>
TierStats CatalogStats(absl::string_view name, const std::map<std::string, Sequence>& sequences) {
  TierStats stats;
  stats.name = std::string(name);
  for (const auto& entry : sequences) {
    stats.blocks += entry.second.blocks.size();
    stats.bytes += entry.second.bytes;
  }
  return stats;
}

// Serializes mutations of one sequence (put/drop/overwrite of its metadata) while letting
// different sequences proceed in parallel, with a fixed number of mutexes picked by hash.
class SequenceLockTable {
 public:
  absl::Mutex& For(absl::string_view sequence_key);

 private:
  static constexpr int kStripes = 64;
  absl::Mutex stripes_[kStripes];
};

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_STORE_UTIL_H_
