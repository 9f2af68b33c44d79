// The narrow file-I/O interface the POSIX directory store goes through, so tests can inject
// faults (short writes, ENOSPC, failed fsync, a crash between write and rename) without touching
// the store. Every call returns a Status naming the path and the errno text; nothing throws.
// Implementations must be thread-safe.
#ifndef KVSTAR_STORAGE_POSIX_IO_H_
#define KVSTAR_STORAGE_POSIX_IO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvstar::storage {

class FileIo {
 public:
  virtual ~FileIo() = default;

  // Creates `path` exclusively (O_CREAT|O_EXCL) for writing. Returns the file descriptor.
  virtual absl::StatusOr<int> CreateExclusive(const std::string& path) = 0;
  // Opens `path` read-only. NotFound when it does not exist.
  virtual absl::StatusOr<int> OpenForRead(const std::string& path) = 0;
  virtual absl::Status Close(int fd) = 0;
  // Writes all of `data` at `offset`, retrying short writes.
  virtual absl::Status WriteAt(int fd, absl::string_view data, uint64_t offset) = 0;
  // Reads exactly `size` bytes at `offset` into `buffer`; DataLoss if the file ends first.
  virtual absl::Status ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) = 0;
  virtual absl::StatusOr<uint64_t> FileSize(int fd) = 0;
  virtual absl::Status Sync(int fd) = 0;
  // Renames atomically, replacing `to` if it exists.
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;
  // Removes a file. OK when it does not exist.
  virtual absl::Status Unlink(const std::string& path) = 0;
  // Creates a directory. OK when it already exists.
  virtual absl::Status MakeDirectory(const std::string& path) = 0;
  // Names in a directory, without "." and "..". NotFound when the directory does not exist.
  virtual absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& path) = 0;
  virtual absl::StatusOr<bool> IsDirectory(const std::string& path) = 0;
  // fsyncs a directory so the entries created, renamed or removed in it are durable.
  virtual absl::Status SyncDirectory(const std::string& path) = 0;
  // Removes a directory and everything below it. OK when it does not exist.
  virtual absl::Status RemoveTree(const std::string& path) = 0;
};

// The Status a FileIo call returns when the system call failed with `error_number`: as
// absl::ErrnoToStatus (ENOSPC is ResourceExhausted, ENOENT NotFound, ...), except that EIO, a
// device error, is Unavailable rather than Unknown. `message` names the operation and path.
absl::Status FileIoError(int error_number, absl::string_view message);

// The real thing: POSIX calls on the local or NFS file system. Never deleted.
FileIo* DefaultFileIo();

// Forwards every call to `target` (not owned). Subclasses override the calls they change, the way
// LevelDB's EnvWrapper is used by its fault-injection tests.
class FileIoWrapper : public FileIo {
 public:
  explicit FileIoWrapper(FileIo* target) : target_(target) {}
  FileIo* target() const { return target_; }

  absl::StatusOr<int> CreateExclusive(const std::string& path) override {
    return target_->CreateExclusive(path);
  }
  absl::StatusOr<int> OpenForRead(const std::string& path) override {
    return target_->OpenForRead(path);
  }
  absl::Status Close(int fd) override { return target_->Close(fd); }
  absl::Status WriteAt(int fd, absl::string_view data, uint64_t offset) override {
    return target_->WriteAt(fd, data, offset);
  }
  absl::Status ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) override {
    return target_->ReadAt(fd, offset, size, buffer);
  }
  absl::StatusOr<uint64_t> FileSize(int fd) override { return target_->FileSize(fd); }
  absl::Status Sync(int fd) override { return target_->Sync(fd); }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    return target_->Rename(from, to);
  }
  absl::Status Unlink(const std::string& path) override { return target_->Unlink(path); }
  absl::Status MakeDirectory(const std::string& path) override {
    return target_->MakeDirectory(path);
  }
  absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& path) override {
    return target_->ListDirectory(path);
  }
  absl::StatusOr<bool> IsDirectory(const std::string& path) override {
    return target_->IsDirectory(path);
  }
  absl::Status SyncDirectory(const std::string& path) override {
    return target_->SyncDirectory(path);
  }
  absl::Status RemoveTree(const std::string& path) override { return target_->RemoveTree(path); }

 private:
  FileIo* const target_;
};

// Closes a descriptor when it goes out of scope (errors on close of a read-only file are moot).
class ScopedFd {
 public:
  ScopedFd(FileIo* io, int fd) : io_(io), fd_(fd) {}
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() {
    if (fd_ >= 0) io_->Close(fd_).IgnoreError();
  }
  int get() const { return fd_; }
  // Closes now, returning the error a write-back on close may report.
  absl::Status Close() {
    const int fd = fd_;
    fd_ = -1;
    return io_->Close(fd);
  }

 private:
  FileIo* io_;
  int fd_;
};

// Names of temporary files: ".tmp-" followed by anything. Stores skip and remove them at open.
constexpr absl::string_view kTempFilePrefix = ".tmp-";

// Durably publishes `pieces` (concatenated) as `dir`/`name`: writes a fresh temporary file in
// `dir`, fsyncs it, then renames it over `name`. The caller fsyncs `dir` (once, after all the
// files it publishes together). On failure the temporary file is removed and `name` untouched.
absl::Status WriteFileAtomically(FileIo* io, const std::string& dir, const std::string& name,
                                 absl::Span<const absl::string_view> pieces);

// Reads a whole file.
absl::StatusOr<std::string> ReadWholeFile(FileIo* io, const std::string& path);

}  // namespace kvstar::storage

#endif  // KVSTAR_STORAGE_POSIX_IO_H_
