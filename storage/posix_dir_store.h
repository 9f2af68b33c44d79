// POSIX/NFS directory backend of BlockStore (opened with OpenPosixDirStore in block_store.h).
//
// Layout under the root directory:
//   seq/<shard>/<hex of sequence key>/meta                    metadata record
//   seq/<shard>/<hex of sequence key>/<gen>-<layer>.seg       segment files
//   trash/                                                    sequences being dropped
// <shard> is two hex digits of a hash of the sequence key (keeps directories small). Sequence keys
// are at most 127 bytes (their hex form is one directory name, at most 255 bytes).
//
// A PutBlocks batch gets one generation number and writes, per layer, one segment: the batch's
// blocks of that layer (K then V, back to back) followed by an index (block_index, offset,
// lengths, checksum per block) and a fixed-size trailer (generation, layer, number of segments in
// the batch, index checksum, magic). Each segment is written to a temporary file, fsynced and
// renamed into place; the directory is fsynced before the batch is acknowledged. At open, a batch
// whose segments are not all present (a crash between renames) is discarded whole, the newest
// generation of each block wins, and segments none of whose blocks are current are deleted.
//
// The in-memory index (block -> segment, offset, lengths, checksum) is rebuilt at open by reading
// every segment's index, so open cost grows with the number of segments, not with bytes stored.
// Reads open each segment file once per GetBlocks and pread its blocks in offset order.
//
// Durability: an OK PutSequence/PutBlocks has fsynced file data and directory entries.
// Sharing: the directory may live on NFS and be opened by another node after this one closes it;
// two processes must not have it open for writing at the same time (each keeps its own index).
#ifndef KVSTAR_STORAGE_POSIX_DIR_STORE_H_
#define KVSTAR_STORAGE_POSIX_DIR_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "storage/block_store.h"
#include "storage/posix_io.h"

namespace kvstar::storage {

// OpenPosixDirStore with every file operation going through `io` (not owned; must outlive the
// store), for fault-injection tests.
absl::StatusOr<std::unique_ptr<BlockStore>> OpenPosixDirStoreWithIo(const std::string& dir,
                                                                    FileIo* io);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_POSIX_DIR_STORE_H_
