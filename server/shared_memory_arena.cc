#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvstar::server {
namespace {

constexpr uint64_t kAlignment = 64;

uint64_t AlignUp(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

}  // namespace

void CopyToSegment(char* to, const char* from, size_t bytes) {
#if defined(__SSE2__)
  // Head up to 16-byte alignment of the destination, then whole 64-byte lines, then the tail.
  const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(to) % 16) % 16);
  std::memcpy(to, from, head);
  size_t i = head;
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + i + 48), d);
  }
  std::memcpy(to + i, from + i, bytes - i);
  _mm_sfence();
#else
  std::memcpy(to, from, bytes);
#endif
}

absl::StatusOr<std::unique_ptr<SharedMemoryArena>> SharedMemoryArena::Create(uint64_t bytes,
                                                                             std::string id) {
  if (bytes == 0) return absl::InvalidArgumentError("a shared-memory segment of 0 bytes");
  const int fd = memfd_create(id.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("memfd_create of segment ", id, ": ", std::strerror(errno)));
  }
  void* base = MAP_FAILED;
  auto fail = [&](const char* what, int err) {
    if (base != MAP_FAILED) munmap(base, bytes);
    close(fd);
    const std::string message =
        absl::StrCat(what, " of ", bytes, " bytes for segment ", id, ": ", std::strerror(err));
    return err == EINVAL ? absl::FailedPreconditionError(message)
                         : absl::ResourceExhaustedError(message);
  };
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate", errno);
  if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    return fail("posix_fallocate", err);
  }
  // Mapped writable before F_SEAL_FUTURE_WRITE: from then on this is the only writable mapping.
  base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap", errno);
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) !=
      0) {
    return fail("sealing (F_ADD_SEALS)", errno);
  }
  return std::unique_ptr<SharedMemoryArena>(
      new SharedMemoryArena(std::move(id), fd, static_cast<char*>(base), bytes));
}

SharedMemoryArena::SharedMemoryArena(std::string id, int fd, char* base, uint64_t size)
    : id_(std::move(id)), fd_(fd), base_(base), size_(size) {
  free_[0] = {size, kZeroed};
}

SharedMemoryArena::~SharedMemoryArena() {
  munmap(base_, size_);
  close(fd_);
}

std::optional<uint64_t> SharedMemoryArena::Allocate(uint64_t bytes) {
  const uint64_t want = AlignUp(std::max<uint64_t>(bytes, 1));
  absl::MutexLock lock(&mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second.length < want) continue;
    const uint64_t offset = it->first;
    const FreeRange rest{it->second.length - want, it->second.owner};
    free_.erase(it);
    if (rest.length > 0) free_[offset + want] = rest;
    allocated_[offset] = want;
    std::memset(base_ + offset + bytes, 0, want - bytes);
    return offset;
  }
  return std::nullopt;
}

void SharedMemoryArena::Release(absl::Span<const uint64_t> offsets, uint64_t owner) {
  absl::MutexLock lock(&mu_);
  for (uint64_t offset : offsets) {
    auto found = allocated_.find(offset);
    if (found == allocated_.end()) continue;
    const uint64_t length = found->second;
    allocated_.erase(found);
    ReturnLocked(offset, length, owner);
  }
}

void SharedMemoryArena::Free(absl::Span<const uint64_t> offsets, retrieval::ThreadPool* pool) {
  std::vector<std::pair<uint64_t, uint64_t>> regions;  // offset, length
  regions.reserve(offsets.size());
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t offset : offsets) {
      auto found = allocated_.find(offset);
      if (found == allocated_.end()) continue;
      regions.emplace_back(offset, found->second);
      allocated_.erase(found);
    }
  }
  ZeroAndReturn(regions, pool);
}

void SharedMemoryArena::ZeroReleased(uint64_t owner, retrieval::ThreadPool* pool) {
  std::vector<std::pair<uint64_t, uint64_t>> regions;  // offset, length
  {
    absl::MutexLock lock(&mu_);
    for (auto it = free_.begin(); it != free_.end();) {
      if (it->second.owner != owner) {
        ++it;
        continue;
      }
      regions.emplace_back(it->first, it->second.length);
      it = free_.erase(it);
    }
  }
  ZeroAndReturn(regions, pool);
}

void SharedMemoryArena::ZeroAndReturn(const std::vector<std::pair<uint64_t, uint64_t>>& regions,
                                      retrieval::ThreadPool* pool) {
  // Neither allocated nor free while they are zeroed: no one else touches them, and the lock is
  // not held across the pass over their bytes.
  auto zero = [&](size_t i, size_t) {
    std::memset(base_ + regions[i].first, 0, regions[i].second);
  };
  if (pool != nullptr && regions.size() > 1) {
    pool->ParallelFor(regions.size(), zero);
  } else {
    for (size_t i = 0; i < regions.size(); ++i) zero(i, 0);
  }
  absl::MutexLock lock(&mu_);
  for (const auto& [offset, length] : regions) ReturnLocked(offset, length, kZeroed);
}

void SharedMemoryArena::ReturnLocked(uint64_t offset, uint64_t length, uint64_t owner) {
  uint64_t start = offset;
  // Coalesce with the free neighbours on both sides that hold the same kind of bytes.
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + length == next->first && next->second.owner == owner) {
    length += next->second.length;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.length == start && prev->second.owner == owner) {
      start = prev->first;
      length += prev->second.length;
      free_.erase(prev);
    }
  }
  free_[start] = {length, owner};
}

uint64_t SharedMemoryArena::free_bytes() const {
  absl::MutexLock lock(&mu_);
  uint64_t total = 0;
  for (const auto& [offset, range] : free_) total += range.length;
  return total;
}

}  // namespace kvstar::server
