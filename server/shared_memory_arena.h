// SharedMemoryArena: a POSIX shared-memory segment the server fills with block bytes for
// co-located clients, who map it read-only and copy from it straight to the GPU. Regions are
// allocated first-fit and freed explicitly.
//
// Thread-safe.
#ifndef KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_
#define KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace kvstar::server {

class SharedMemoryArena {
 public:
  // Creates segment "/kvstar-<16 random hex digits>" of `bytes` (mode 0600: the client runs as
  // the server's user), with its pages reserved up front so a full /dev/shm fails here instead of
  // as SIGBUS later. The arena holds a shared flock on it while it lives; segments nobody holds
  // (left by servers that died) are removed first.
  static absl::StatusOr<std::unique_ptr<SharedMemoryArena>> Create(uint64_t bytes);
  ~SharedMemoryArena();  // unmaps and unlinks the segment

  // Offset of `bytes` free bytes (64-byte aligned), or nullopt when no free range is that large.
  std::optional<uint64_t> Allocate(uint64_t bytes);
  // Returns the region that Allocate gave at `offset`.
  void Free(uint64_t offset);

  char* base() const { return base_; }
  uint64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  uint64_t free_bytes() const;

 private:
  SharedMemoryArena(std::string name, int fd, char* base, uint64_t size);

  const std::string name_;
  const int fd_;  // keeps the liveness lock
  char* const base_;
  const uint64_t size_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, uint64_t> free_ ABSL_GUARDED_BY(mu_);       // offset -> length
  std::map<uint64_t, uint64_t> allocated_ ABSL_GUARDED_BY(mu_);  // offset -> length
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_
