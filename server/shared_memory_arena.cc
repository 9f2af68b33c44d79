#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"

namespace kvstar::server {
namespace {

constexpr uint64_t kAlignment = 64;
constexpr char kPrefix[] = "kvstar-";

uint64_t AlignUp(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// Segments are named kvstar-<pid>-<n>; one whose pid no longer runs was left by a crash.
void RemoveStaleSegments() {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0) continue;
    std::vector<std::string> parts = absl::StrSplit(name.substr(sizeof(kPrefix) - 1), '-');
    int pid = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &pid) || pid <= 0) continue;
    if (kill(pid, 0) == 0 || errno != ESRCH) continue;
    if (shm_unlink(("/" + name).c_str()) == 0) {
      spdlog::info("removed shared-memory segment {} left by process {}", name, pid);
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryArena>> SharedMemoryArena::Create(uint64_t bytes) {
  RemoveStaleSegments();
  static std::atomic<int> counter{0};
  const std::string name = absl::StrCat("/", kPrefix, getpid(), "-", counter++);
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("shm_open ", name, ": ", std::strerror(errno)));
  }
  auto fail = [&](const char* what, int err) {
    close(fd);
    shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " of ", bytes, " bytes for ", name, ": ", std::strerror(err)));
  };
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate", errno);
  if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    return fail("posix_fallocate", err);
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);
  if (base == MAP_FAILED) {
    shm_unlink(name.c_str());
    return absl::InternalError(absl::StrCat("mmap ", name, ": ", std::strerror(mmap_errno)));
  }
  return std::unique_ptr<SharedMemoryArena>(
      new SharedMemoryArena(name, static_cast<char*>(base), bytes));
}

SharedMemoryArena::SharedMemoryArena(std::string name, char* base, uint64_t size)
    : name_(std::move(name)), base_(base), size_(size) {
  free_[0] = size;
}

SharedMemoryArena::~SharedMemoryArena() {
  munmap(base_, size_);
  shm_unlink(name_.c_str());
}

std::optional<uint64_t> SharedMemoryArena::Allocate(uint64_t bytes) {
  const uint64_t want = AlignUp(std::max<uint64_t>(bytes, 1));
  absl::MutexLock lock(&mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < want) continue;
    const uint64_t offset = it->first;
    const uint64_t rest = it->second - want;
    free_.erase(it);
    if (rest > 0) free_[offset + want] = rest;
    allocated_[offset] = want;
    return offset;
  }
  return std::nullopt;
}

void SharedMemoryArena::Free(uint64_t offset) {
  absl::MutexLock lock(&mu_);
  auto found = allocated_.find(offset);
  if (found == allocated_.end()) return;
  uint64_t start = offset, length = found->second;
  allocated_.erase(found);
  // Coalesce with the free neighbours on both sides.
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + length == next->first) {
    length += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  free_[start] = length;
}

uint64_t SharedMemoryArena::free_bytes() const {
  absl::MutexLock lock(&mu_);
  uint64_t total = 0;
  for (const auto& [offset, length] : free_) total += length;
  return total;
}

}  // namespace kvstar::server
