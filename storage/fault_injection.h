// Fault injection through the storage I/O interfaces, for tests: a FileIo wrapper for the POSIX
// directory store and a rocksdb::FileSystem wrapper for the RocksDB store, both driven by one
// FaultInjector that says which call fails and how.
//
//   FaultInjector faults;
//   FaultInjectingFileIo io(DefaultFileIo(), &faults);
//   auto store = OpenPosixDirStoreWithIo(dir, &io);
//   faults.Arm({IoOperation::kSync, FaultKind::kIoError, /*nth_call=*/2});
//   // the second fsync from now fails with EIO
//
// What the kinds do:
//   kNoSpace     the call fails with ENOSPC (rocksdb: IOStatus::NoSpace) and does nothing;
//                reads, opens and directory fsyncs fail with EIO instead
//   kIoError     the call fails with EIO (rocksdb: IOStatus::IOError) and does nothing
//   kShortWrite  writes only: the first half of the bytes reach the file, then ENOSPC
//   kBitFlip     writes and reads: the call succeeds with one bit flipped in the middle byte of
//                what it wrote or read (a device that silently damages data)
//   kCrash       the process dies by SIGKILL at this call, before it; a write first writes the
//                first half of its bytes (a torn write). For crash tests' kill points.
// Thread-safe.
#ifndef KVSTAR_STORAGE_FAULT_INJECTION_H_
#define KVSTAR_STORAGE_FAULT_INJECTION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "rocksdb/file_system.h"
#include "storage/posix_io.h"

namespace kvstar::storage {

enum class IoOperation {
  kCreate,         // creating a file for writing
  kOpenForRead,    // opening a file for reading
  kWrite,          // writing bytes (rocksdb: Append)
  kRead,           // reading bytes (rocksdb: random-access reads, as of table files)
  kSync,           // fsync of a file (rocksdb: Sync, Fsync)
  kRename,         // rename (the "from" path is matched)
  kSyncDirectory,  // fsync of a directory
};

enum class FaultKind { kNoSpace, kIoError, kShortWrite, kBitFlip, kCrash };

struct FaultRule {
  IoOperation operation = IoOperation::kWrite;
  FaultKind kind = FaultKind::kIoError;
  // The first matching call to fault, counting from 1 since the rule was armed.
  uint64_t nth_call = 1;
  // How many matching calls in a row fault from there; 0: every later one.
  uint64_t count = 1;
  // Only calls on a path containing this match; "" matches every path.
  std::string path_contains;
};

absl::string_view IoOperationName(IoOperation operation);
absl::string_view FaultKindName(FaultKind kind);

class FaultInjector {
 public:
  // Adds a rule. Rules are independent: each counts its own matching calls.
  void Arm(FaultRule rule) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes every rule.
  void Clear() ABSL_LOCKS_EXCLUDED(mu_);
  // Faults injected since construction.
  uint64_t injected() const ABSL_LOCKS_EXCLUDED(mu_);
  // Calls of `operation` the wrappers reported since construction, faulted or not.
  uint64_t calls(IoOperation operation) const ABSL_LOCKS_EXCLUDED(mu_);

  // Called by the wrappers once per operation: the fault to inject into this call, if any.
  std::optional<FaultKind> Next(IoOperation operation, absl::string_view path)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct ArmedRule {
    FaultRule rule;
    uint64_t calls = 0;
  };
  mutable absl::Mutex mu_;
  std::vector<ArmedRule> rules_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<IoOperation, uint64_t> calls_ ABSL_GUARDED_BY(mu_);
  uint64_t injected_ ABSL_GUARDED_BY(mu_) = 0;
};

// A FileIo that consults `faults` before each call and otherwise forwards to `target`. Neither is
// owned; both must outlive it. RemoveTree is forwarded whole (its inner calls are not faulted).
class FaultInjectingFileIo final : public FileIoWrapper {
 public:
  FaultInjectingFileIo(FileIo* target, FaultInjector* faults)
      : FileIoWrapper(target), faults_(faults) {}

  absl::StatusOr<int> CreateExclusive(const std::string& path) override;
  absl::StatusOr<int> OpenForRead(const std::string& path) override;
  absl::Status Close(int fd) override;
  absl::Status WriteAt(int fd, absl::string_view data, uint64_t offset) override;
  absl::Status ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) override;
  absl::Status Sync(int fd) override;
  absl::Status Rename(const std::string& from, const std::string& to) override;
  absl::Status SyncDirectory(const std::string& path) override;

 private:
  std::string PathOf(int fd) ABSL_LOCKS_EXCLUDED(mu_);

  FaultInjector* const faults_;
  absl::Mutex mu_;
  absl::flat_hash_map<int, std::string> paths_ ABSL_GUARDED_BY(mu_);  // open descriptors
};

// A rocksdb::FileSystem that consults `faults` (not owned; must outlive it) on file creation,
// appends, syncs and random-access reads, and otherwise forwards to `target`.
std::shared_ptr<rocksdb::FileSystem> NewFaultInjectingFileSystem(
    std::shared_ptr<rocksdb::FileSystem> target, FaultInjector* faults);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_FAULT_INJECTION_H_
