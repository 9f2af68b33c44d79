// Helpers shared by the BlockStore backends: batch validation, error messages that name blocks,
// and fixed-width integer encoding. Internal to //storage.
#ifndef KVSTAR_STORAGE_STORE_UTIL_H_
#define KVSTAR_STORAGE_STORE_UTIL_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "absl/synchronization/mutex.h"
#include "storage/block_store.h"

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

// Big-endian: keys that must sort numerically as bytes (RocksDB).
void AppendBigEndian32(uint32_t v, std::string* out);
uint32_t ReadBigEndian32(const char* p);

// Little-endian: on-disk headers and indices.
void AppendLittleEndian32(uint32_t v, std::string* out);
void AppendLittleEndian64(uint64_t v, std::string* out);
uint32_t ReadLittleEndian32(const char* p);
uint64_t ReadLittleEndian64(const char* p);

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
