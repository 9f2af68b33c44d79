// RocksDB backend of BlockStore (opened with OpenRocksDbStore in block_store.h).
//
// Key layout, chosen so one sequence's blocks of one layer are adjacent and a whole sequence is
// one contiguous key range (DropSequence is one DeleteRange):
//   block:    'B' + big-endian u32 length of sequence key + sequence key + BE u32 layer + BE u32
//   index metadata: 'M' + big-endian u32 length of sequence key + sequence key
//   reclaim marker: 'R' + big-endian u32 length of sequence key + sequence key + BE u64 drop number
// Block value: header (u32 magic, u32 format version, u64 checksum, u64 key length, little-endian)
// followed by K bytes and V bytes.
//
// Dropping: one synced batch holds a range delete of the sequence's blocks, the deletion of its
// metadata and a reclaim marker (value: LE u64 K+V bytes dropped). A background thread then
// compacts the range, which gives the disk space back, and deletes the marker; a marker found at
// open (a crash or shutdown came first) is reclaimed again. Each drop has its own number, so
// finishing one drop's reclaim never removes the marker of a later drop of the same key.
//
// The key encoders are exposed for tools and for tests that damage records on purpose.
#ifndef KVSTAR_STORAGE_ROCKSDB_STORE_H_
#define KVSTAR_STORAGE_ROCKSDB_STORE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "rocksdb/env.h"
#include "storage/block_store.h"

namespace kvstar::storage {

// OpenRocksDbStore with every file operation going through `env` (not owned; must outlive the
// store; nullptr: RocksDB's default), for fault-injection tests.
absl::StatusOr<std::unique_ptr<BlockStore>> OpenRocksDbStoreWithEnv(const std::string& dir,
                                                                    rocksdb::Env* env);

std::string RocksDbBlockKey(absl::string_view sequence_key, BlockId id);
std::string RocksDbMetadataKey(absl::string_view sequence_key);
std::string RocksDbReclaimMarkerKey(absl::string_view sequence_key, uint64_t drop_number);

// Parses a stored block value (the layout above) of block `id` of `sequence_key` into *out.
// DataLoss naming the block when the header is malformed or the checksum does not match the
// bytes; *out is unchanged then. Any bytes are safe to pass (tests/fuzz/block_record_fuzzer.cc).
absl::Status DecodeRocksDbBlockValue(absl::string_view sequence_key, BlockId id,
                                     absl::string_view stored, BlockData* out);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_ROCKSDB_STORE_H_
