#include "storage/fault_injection.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvstar::storage {
namespace {

absl::Status InjectedErrno(int error_number, absl::string_view operation, absl::string_view path) {
  return FileIoError(error_number, absl::StrCat(operation, " ", path, " (injected fault)"));
}

void FlipMiddleBit(char* bytes, size_t size) {
  if (size > 0) bytes[size / 2] ^= 0x10;
}

// What kill -9 at this instant does: no destructor, no flush of user-space buffers.
[[noreturn]] void CrashNow() {
  ::kill(::getpid(), SIGKILL);
  std::abort();  // not reached
}

// kCrash before a call that writes nothing.
void CrashIfAsked(const std::optional<FaultKind>& fault) {
  if (fault == FaultKind::kCrash) CrashNow();
}

}  // namespace

absl::string_view IoOperationName(IoOperation operation) {
  switch (operation) {
    case IoOperation::kCreate:
      return "create";
    case IoOperation::kOpenForRead:
      return "open for read";
    case IoOperation::kWrite:
      return "write";
    case IoOperation::kRead:
      return "read";
    case IoOperation::kSync:
      return "fsync";
    case IoOperation::kRename:
      return "rename";
    case IoOperation::kSyncDirectory:
      return "fsync of directory";
  }
  return "unknown operation";
}

absl::string_view FaultKindName(FaultKind kind) {
  switch (kind) {
    case FaultKind::kNoSpace:
      return "ENOSPC";
    case FaultKind::kIoError:
      return "EIO";
    case FaultKind::kShortWrite:
      return "short write";
    case FaultKind::kBitFlip:
      return "bit flip";
    case FaultKind::kCrash:
      return "crash";
  }
  return "unknown fault";
}

void FaultInjector::Arm(FaultRule rule) {
  absl::MutexLock lock(&mu_);
  rules_.push_back(ArmedRule{std::move(rule), 0});
}

void FaultInjector::Clear() {
  absl::MutexLock lock(&mu_);
  rules_.clear();
}

uint64_t FaultInjector::injected() const {
  absl::MutexLock lock(&mu_);
  return injected_;
}

uint64_t FaultInjector::calls(IoOperation operation) const {
  absl::MutexLock lock(&mu_);
  auto found = calls_.find(operation);
  return found != calls_.end() ? found->second : 0;
}

std::optional<FaultKind> FaultInjector::Next(IoOperation operation, absl::string_view path) {
  absl::MutexLock lock(&mu_);
  ++calls_[operation];
  std::optional<FaultKind> fault;
  for (ArmedRule& armed : rules_) {
    const FaultRule& rule = armed.rule;
    if (rule.operation != operation || !absl::StrContains(path, rule.path_contains)) continue;
    const uint64_t call = ++armed.calls;
    const bool in_window =
        call >= rule.nth_call && (rule.count == 0 || call < rule.nth_call + rule.count);
    if (in_window && !fault.has_value()) fault = rule.kind;
  }
  if (fault.has_value()) ++injected_;
  return fault;
}

// ---- FileIo ----

std::string FaultInjectingFileIo::PathOf(int fd) {
  absl::MutexLock lock(&mu_);
  auto found = paths_.find(fd);
  return found != paths_.end() ? found->second : absl::StrCat("fd ", fd);
}

absl::StatusOr<int> FaultInjectingFileIo::CreateExclusive(const std::string& path) {
  if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kCreate, path)) {
    CrashIfAsked(fault);
    return InjectedErrno(*fault == FaultKind::kNoSpace ? ENOSPC : EIO, "creating", path);
  }
  absl::StatusOr<int> fd = target()->CreateExclusive(path);
  if (fd.ok()) {
    absl::MutexLock lock(&mu_);
    paths_[*fd] = path;
  }
  return fd;
}

absl::StatusOr<int> FaultInjectingFileIo::OpenForRead(const std::string& path) {
  if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kOpenForRead, path)) {
    CrashIfAsked(fault);
    return InjectedErrno(EIO, "opening", path);
  }
  absl::StatusOr<int> fd = target()->OpenForRead(path);
  if (fd.ok()) {
    absl::MutexLock lock(&mu_);
    paths_[*fd] = path;
  }
  return fd;
}

absl::Status FaultInjectingFileIo::Close(int fd) {
  {
    absl::MutexLock lock(&mu_);
    paths_.erase(fd);
  }
  return target()->Close(fd);
}

absl::Status FaultInjectingFileIo::WriteAt(int fd, absl::string_view data, uint64_t offset) {
  const std::string path = PathOf(fd);
  const std::optional<FaultKind> fault = faults_->Next(IoOperation::kWrite, path);
  if (!fault.has_value()) return target()->WriteAt(fd, data, offset);
  switch (*fault) {
    case FaultKind::kNoSpace:
      return InjectedErrno(ENOSPC, "writing", path);
    case FaultKind::kIoError:
      return InjectedErrno(EIO, "writing", path);
    case FaultKind::kShortWrite: {
      absl::Status written = target()->WriteAt(fd, data.substr(0, data.size() / 2), offset);
      if (!written.ok()) return written;
      return InjectedErrno(
          ENOSPC, absl::StrCat("writing (short, ", data.size() / 2, " of ", data.size(), " bytes)"),
          path);
    }
    case FaultKind::kBitFlip: {
      std::string damaged(data);
      FlipMiddleBit(damaged.data(), damaged.size());
      return target()->WriteAt(fd, damaged, offset);
    }
    case FaultKind::kCrash:
      target()->WriteAt(fd, data.substr(0, data.size() / 2), offset).IgnoreError();
      CrashNow();
  }
  return target()->WriteAt(fd, data, offset);
}

absl::Status FaultInjectingFileIo::ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) {
  const std::string path = PathOf(fd);
  const std::optional<FaultKind> fault = faults_->Next(IoOperation::kRead, path);
  if (!fault.has_value()) return target()->ReadAt(fd, offset, size, buffer);
  CrashIfAsked(fault);
  if (*fault != FaultKind::kBitFlip) return InjectedErrno(EIO, "reading", path);
  absl::Status read = target()->ReadAt(fd, offset, size, buffer);
  if (read.ok()) FlipMiddleBit(buffer, size);
  return read;
}

absl::Status FaultInjectingFileIo::Sync(int fd) {
  const std::string path = PathOf(fd);
  if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kSync, path)) {
    CrashIfAsked(fault);
    return InjectedErrno(*fault == FaultKind::kNoSpace ? ENOSPC : EIO, "fsync of", path);
  }
  return target()->Sync(fd);
}

absl::Status FaultInjectingFileIo::Rename(const std::string& from, const std::string& to) {
  if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kRename, from)) {
    CrashIfAsked(fault);
    return InjectedErrno(*fault == FaultKind::kNoSpace ? ENOSPC : EIO, "renaming", from);
  }
  return target()->Rename(from, to);
}

absl::Status FaultInjectingFileIo::SyncDirectory(const std::string& path) {
  if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kSyncDirectory, path)) {
    CrashIfAsked(fault);
    return InjectedErrno(EIO, "fsync of directory", path);
  }
  return target()->SyncDirectory(path);
}

// ---- rocksdb::FileSystem ----
namespace {

rocksdb::IOStatus InjectedIoStatus(FaultKind kind, absl::string_view operation,
                                   const std::string& path) {
  const std::string message = absl::StrCat(operation, " ", path, " (injected fault)");
  if (kind == FaultKind::kNoSpace || kind == FaultKind::kShortWrite) {
    return rocksdb::IOStatus::NoSpace(message);
  }
  return rocksdb::IOStatus::IOError(message);
}

class FaultInjectingWritableFile final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  FaultInjectingWritableFile(std::unique_ptr<rocksdb::FSWritableFile> target, std::string path,
                             FaultInjector* faults)
      : FSWritableFileOwnerWrapper(std::move(target)), path_(std::move(path)), faults_(faults) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* dbg) override {
    return Write(
        data, [&](const rocksdb::Slice& bytes) { return target()->Append(bytes, options, dbg); });
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           const rocksdb::DataVerificationInfo&,
                           rocksdb::IODebugContext* dbg) override {
    // The verification info would describe the undamaged bytes; a lying device passes none on.
    return Append(data, options, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& options,
                                     rocksdb::IODebugContext* dbg) override {
    return Write(data, [&](const rocksdb::Slice& bytes) {
      return target()->PositionedAppend(bytes, offset, options, dbg);
    });
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& options,
                                     const rocksdb::DataVerificationInfo&,
                                     rocksdb::IODebugContext* dbg) override {
    return PositionedAppend(data, offset, options, dbg);
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kSync, path_)) {
      CrashIfAsked(fault);
      return InjectedIoStatus(*fault, "fsync of", path_);
    }
    return target()->Sync(options, dbg);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                          rocksdb::IODebugContext* dbg) override {
    if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kSync, path_)) {
      CrashIfAsked(fault);
      return InjectedIoStatus(*fault, "fsync of", path_);
    }
    return target()->Fsync(options, dbg);
  }

 private:
  template <typename WriteFn>
  rocksdb::IOStatus Write(const rocksdb::Slice& data, WriteFn write) {
    const std::optional<FaultKind> fault = faults_->Next(IoOperation::kWrite, path_);
    if (!fault.has_value()) return write(data);
    switch (*fault) {
      case FaultKind::kNoSpace:
      case FaultKind::kIoError:
        return InjectedIoStatus(*fault, "writing", path_);
      case FaultKind::kShortWrite: {
        rocksdb::IOStatus written = write(rocksdb::Slice(data.data(), data.size() / 2));
        if (!written.ok()) return written;
        return InjectedIoStatus(*fault, "writing (short)", path_);
      }
      case FaultKind::kBitFlip: {
        std::string damaged(data.data(), data.size());
        FlipMiddleBit(damaged.data(), damaged.size());
        return write(rocksdb::Slice(damaged));
      }
      case FaultKind::kCrash:
        write(rocksdb::Slice(data.data(), data.size() / 2)).PermitUncheckedError();
        CrashNow();
    }
    return write(data);
  }

  const std::string path_;
  FaultInjector* const faults_;
};

class FaultInjectingRandomAccessFile final : public rocksdb::FSRandomAccessFileOwnerWrapper {
 public:
  FaultInjectingRandomAccessFile(std::unique_ptr<rocksdb::FSRandomAccessFile> target,
                                 std::string path, FaultInjector* faults)
      : FSRandomAccessFileOwnerWrapper(std::move(target)),
        path_(std::move(path)),
        faults_(faults) {}

  rocksdb::IOStatus Read(uint64_t offset, size_t n, const rocksdb::IOOptions& options,
                         rocksdb::Slice* result, char* scratch,
                         rocksdb::IODebugContext* dbg) const override {
    const std::optional<FaultKind> fault = faults_->Next(IoOperation::kRead, path_);
    CrashIfAsked(fault);
    if (fault.has_value() && *fault != FaultKind::kBitFlip) {
      return InjectedIoStatus(*fault, "reading", path_);
    }
    rocksdb::IOStatus read = target()->Read(offset, n, options, result, scratch, dbg);
    if (read.ok() && fault.has_value() && result->size() > 0) {
      // The result may point into a buffer the file owns (mmap): damage a copy, not the file.
      if (result->data() != scratch) std::memmove(scratch, result->data(), result->size());
      *result = rocksdb::Slice(scratch, result->size());
      FlipMiddleBit(scratch, result->size());
    }
    return read;
  }

  // One Read per request, so every request meets the injector.
  rocksdb::IOStatus MultiRead(rocksdb::FSReadRequest* requests, size_t count,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override {
    for (size_t i = 0; i < count; ++i) {
      rocksdb::FSReadRequest& request = requests[i];
      request.status =
          Read(request.offset, request.len, options, &request.result, request.scratch, dbg);
    }
    return rocksdb::IOStatus::OK();
  }

 private:
  const std::string path_;
  FaultInjector* const faults_;
};

class FaultInjectingFileSystem final : public rocksdb::FileSystemWrapper {
 public:
  FaultInjectingFileSystem(std::shared_ptr<rocksdb::FileSystem> target, FaultInjector* faults)
      : FileSystemWrapper(std::move(target)), faults_(faults) {}

  const char* Name() const override { return "KvstarFaultInjectingFileSystem"; }

  rocksdb::IOStatus NewWritableFile(const std::string& path, const rocksdb::FileOptions& options,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override {
    if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kCreate, path)) {
      CrashIfAsked(fault);
      return InjectedIoStatus(*fault, "creating", path);
    }
    std::unique_ptr<rocksdb::FSWritableFile> file;
    rocksdb::IOStatus status = target()->NewWritableFile(path, options, &file, dbg);
    if (status.ok()) {
      *result = std::make_unique<FaultInjectingWritableFile>(std::move(file), path, faults_);
    }
    return status;
  }

  rocksdb::IOStatus ReopenWritableFile(const std::string& path, const rocksdb::FileOptions& options,
                                       std::unique_ptr<rocksdb::FSWritableFile>* result,
                                       rocksdb::IODebugContext* dbg) override {
    std::unique_ptr<rocksdb::FSWritableFile> file;
    rocksdb::IOStatus status = target()->ReopenWritableFile(path, options, &file, dbg);
    if (status.ok()) {
      *result = std::make_unique<FaultInjectingWritableFile>(std::move(file), path, faults_);
    }
    return status;
  }

  rocksdb::IOStatus NewRandomAccessFile(const std::string& path,
                                        const rocksdb::FileOptions& options,
                                        std::unique_ptr<rocksdb::FSRandomAccessFile>* result,
                                        rocksdb::IODebugContext* dbg) override {
    if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kOpenForRead, path)) {
      CrashIfAsked(fault);
      return InjectedIoStatus(*fault, "opening", path);
    }
    std::unique_ptr<rocksdb::FSRandomAccessFile> file;
    rocksdb::IOStatus status = target()->NewRandomAccessFile(path, options, &file, dbg);
    if (status.ok()) {
      *result = std::make_unique<FaultInjectingRandomAccessFile>(std::move(file), path, faults_);
    }
    return status;
  }

  rocksdb::IOStatus RenameFile(const std::string& from, const std::string& to,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override {
    if (std::optional<FaultKind> fault = faults_->Next(IoOperation::kRename, from)) {
      CrashIfAsked(fault);
      return InjectedIoStatus(*fault, "renaming", from);
    }
    return target()->RenameFile(from, to, options, dbg);
  }

 private:
  FaultInjector* const faults_;
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> NewFaultInjectingFileSystem(
    std::shared_ptr<rocksdb::FileSystem> target, FaultInjector* faults) {
  return std::make_shared<FaultInjectingFileSystem>(std::move(target), faults);
}

}  // namespace kvstar::storage
