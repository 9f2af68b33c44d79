#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace kvstar::server {
namespace {

constexpr uint64_t kAlignment = 64;
constexpr char kPrefix[] = "kvstar-";

uint64_t AlignUp(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// A live server holds a shared flock on its segment for as long as it runs; a segment whose
// exclusive lock can be taken was left by a server that died. (Pids do not tell: servers in other
// PID namespaces — containers, sandboxes — share /dev/shm and reuse pids.)
void RemoveStaleSegments() {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0) continue;
    const int fd = shm_open(("/" + name).c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    if (flock(fd, LOCK_EX | LOCK_NB) == 0 && shm_unlink(("/" + name).c_str()) == 0) {
      spdlog::info("event=stale_segment_removed segment={} (left by a server that is gone)", name);
    }
    close(fd);
  }
}

std::string RandomSegmentName() {
  uint64_t bits = 0;
  std::ifstream("/dev/urandom", std::ios::binary)
      .read(reinterpret_cast<char*>(&bits), sizeof(bits));
  bits ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return absl::StrCat("/", kPrefix, absl::Hex(bits, absl::kZeroPad16));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryArena>> SharedMemoryArena::Create(uint64_t bytes) {
  RemoveStaleSegments();
  std::string name;
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    name = RandomSegmentName();
    fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("shm_open ", name, ": ", std::strerror(errno)));
  }
  auto fail = [&](const char* what, int err) {
    close(fd);
    shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " of ", bytes, " bytes for ", name, ": ", std::strerror(err)));
  };
  // Held until the arena is destroyed (or the process dies): marks the segment as live.
  if (flock(fd, LOCK_SH) != 0) return fail("flock", errno);
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate", errno);
  if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    return fail("posix_fallocate", err);
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap", errno);
  return std::unique_ptr<SharedMemoryArena>(
      new SharedMemoryArena(name, fd, static_cast<char*>(base), bytes));
}

SharedMemoryArena::SharedMemoryArena(std::string name, int fd, char* base, uint64_t size)
    : name_(std::move(name)), fd_(fd), base_(base), size_(size) {
  free_[0] = size;
}

SharedMemoryArena::~SharedMemoryArena() {
  munmap(base_, size_);
  shm_unlink(name_.c_str());
  close(fd_);
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
