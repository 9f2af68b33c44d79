#include "storage/posix_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"

namespace kvstar::storage {
namespace {

absl::Status ErrnoError(int error_number, absl::string_view operation, const std::string& path) {
  return FileIoError(error_number, absl::StrCat(operation, " ", path));
}

class PosixFileIo final : public FileIo {
 public:
  absl::StatusOr<int> CreateExclusive(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoError(errno, "creating", path);
    return fd;
  }

  absl::StatusOr<int> OpenForRead(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoError(errno, "opening", path);
    return fd;
  }

  absl::Status Close(int fd) override {
    // Linux releases the descriptor even when close fails, so it is never retried.
    if (::close(fd) != 0) return FileIoError(errno, absl::StrCat("closing fd ", fd));
    return absl::OkStatus();
  }

  absl::Status WriteAt(int fd, absl::string_view data, uint64_t offset) override {
    while (!data.empty()) {
      const ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        return FileIoError(errno, absl::StrCat("writing fd ", fd, " at ", offset));
      }
      data.remove_prefix(static_cast<size_t>(n));
      offset += static_cast<uint64_t>(n);
    }
    return absl::OkStatus();
  }

  absl::Status ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) override {
    while (size > 0) {
      const ssize_t n = ::pread(fd, buffer, size, static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        return FileIoError(errno, absl::StrCat("reading fd ", fd, " at ", offset));
      }
      if (n == 0) {
        return absl::DataLossError(
            absl::StrCat("fd ", fd, " ends before offset ", offset, " + ", size, " bytes"));
      }
      buffer += n;
      size -= static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> FileSize(int fd) override {
    struct stat st;
    if (::fstat(fd, &st) != 0) return FileIoError(errno, absl::StrCat("fstat fd ", fd));
    return static_cast<uint64_t>(st.st_size);
  }

  absl::Status Sync(int fd) override {
    if (::fsync(fd) != 0) return FileIoError(errno, absl::StrCat("fsync fd ", fd));
    return absl::OkStatus();
  }

  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return ErrnoError(errno, "renaming", absl::StrCat(from, " to ", to));
    }
    return absl::OkStatus();
  }

  absl::Status Unlink(const std::string& path) override {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoError(errno, "removing", path);
    return absl::OkStatus();
  }

  absl::Status MakeDirectory(const std::string& path) override {
    if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoError(errno, "creating directory", path);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& path) override {
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return ErrnoError(errno, "listing", path);
    std::vector<std::string> names;
    errno = 0;
    while (const struct dirent* entry = ::readdir(dir)) {
      const std::string name = entry->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    const int error_number = errno;
    ::closedir(dir);
    if (error_number != 0) return ErrnoError(error_number, "listing", path);
    return names;
  }

  absl::StatusOr<bool> IsDirectory(const std::string& path) override {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) return ErrnoError(errno, "stat", path);
    return S_ISDIR(st.st_mode);
  }

  absl::Status SyncDirectory(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return ErrnoError(errno, "opening directory", path);
    const int result = ::fsync(fd);
    const int error_number = errno;
    ::close(fd);
    if (result != 0) return ErrnoError(error_number, "fsync of directory", path);
    return absl::OkStatus();
  }

  absl::Status RemoveTree(const std::string& path) override {
    absl::StatusOr<bool> is_directory = IsDirectory(path);
    if (absl::IsNotFound(is_directory.status())) return absl::OkStatus();
    if (!is_directory.ok()) return is_directory.status();
    if (!*is_directory) return Unlink(path);
    absl::StatusOr<std::vector<std::string>> names = ListDirectory(path);
    if (!names.ok()) return names.status();
    for (const std::string& name : *names) {
      absl::Status removed = RemoveTree(absl::StrCat(path, "/", name));
      if (!removed.ok()) return removed;
    }
    if (::rmdir(path.c_str()) != 0 && errno != ENOENT) {
      return ErrnoError(errno, "removing directory", path);
    }
    return absl::OkStatus();
  }
};

}  // namespace

absl::Status FileIoError(int error_number, absl::string_view message) {
  // absl maps EIO to UNKNOWN, which tells a client nothing.
  if (error_number == EIO) {
    return absl::UnavailableError(absl::StrCat(message, ": ", std::strerror(EIO)));
  }
  return absl::ErrnoToStatus(error_number, message);
}

FileIo* DefaultFileIo() {
  static FileIo* const io = new PosixFileIo();
  return io;
}

absl::Status WriteFileAtomically(FileIo* io, const std::string& dir, const std::string& name,
                                 absl::Span<const absl::string_view> pieces) {
  // Unique within the process by counter, and across processes and NFS clients (whose pids may
  // collide) by a random per-process nonce.
  static const uint64_t process_nonce =
      (uint64_t{std::random_device()()} << 32) ^ std::random_device()();
  static std::atomic<uint64_t> counter{0};
  const std::string temp_path =
      absl::StrCat(dir, "/", kTempFilePrefix, absl::Hex(process_nonce), "-",
                   counter.fetch_add(1, std::memory_order_relaxed), "-", name);
  absl::StatusOr<int> fd = io->CreateExclusive(temp_path);
  if (!fd.ok()) return fd.status();
  ScopedFd file(io, *fd);
  absl::Status status;
  uint64_t offset = 0;
  for (absl::string_view piece : pieces) {
    status = io->WriteAt(file.get(), piece, offset);
    if (!status.ok()) break;
    offset += piece.size();
  }
  if (status.ok()) status = io->Sync(file.get());
  if (status.ok()) status = file.Close();
  if (status.ok()) status = io->Rename(temp_path, absl::StrCat(dir, "/", name));
  if (!status.ok()) io->Unlink(temp_path).IgnoreError();
  return status;
}

absl::StatusOr<std::string> ReadWholeFile(FileIo* io, const std::string& path) {
  absl::StatusOr<int> fd = io->OpenForRead(path);
  if (!fd.ok()) return fd.status();
  ScopedFd file(io, *fd);
  absl::StatusOr<uint64_t> size = io->FileSize(file.get());
  if (!size.ok()) return size.status();
  std::string contents(*size, '\0');
  absl::Status read = io->ReadAt(file.get(), 0, *size, contents.data());
  if (!read.ok()) return read;
  return contents;
}

}  // namespace kvstar::storage
