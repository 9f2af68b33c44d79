#include "client/shared_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace kvstar::client_internal {

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Map(const std::string& name,
                                                                  uint64_t bytes,
                                                                  DeviceBackend* backend) {
  if (bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory segment ", name, " has 0 bytes"));
  }
  const int fd = shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("shm_open(", name, ", O_RDONLY): ", std::strerror(errno)));
  }
  struct stat info;
  if (fstat(fd, &info) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("fstat of segment ", name, ": ", std::strerror(err)));
  }
  if (static_cast<uint64_t>(info.st_size) < bytes) {
    close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("segment ", name, " holds ", info.st_size, " bytes, the server said ", bytes));
  }
  void* base = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);  // the mapping keeps the object
  if (base == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mmap of segment ", name, " (", bytes,
                                            " bytes): ", std::strerror(mmap_errno)));
  }
  if (absl::Status status = backend->RegisterHost(base, bytes, /*read_only=*/true); !status.ok()) {
    munmap(base, bytes);
    return absl::Status(status.code(),
                        absl::StrCat("registering segment ", name, ": ", status.message()));
  }
  return std::unique_ptr<SharedSegment>(
      new SharedSegment(name, static_cast<char*>(base), bytes, backend));
}

SharedSegment::SharedSegment(std::string name, char* base, uint64_t size, DeviceBackend* backend)
    : name_(std::move(name)), base_(base), size_(size), backend_(backend) {}

SharedSegment::~SharedSegment() {
  backend_->UnregisterHost(base_);
  munmap(base_, size_);
}

const char* SharedSegment::Region(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > (size_ - offset) / 2) return nullptr;
  return base_ + offset;
}

absl::StatusOr<std::string> ThisHostId() {
  std::ifstream file("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (!std::getline(file, id) || id.empty()) {
    return absl::UnavailableError("cannot read /proc/sys/kernel/random/boot_id");
  }
  return std::string(absl::StripAsciiWhitespace(id));
}

}  // namespace kvstar::client_internal
