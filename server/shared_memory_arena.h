// SharedMemoryArena: one tenant's shared-memory segment, which the server fills with block bytes
// for that tenant's co-located clients; they receive its descriptor over the segment handoff
// (server/segment_handoff.h), map it read-only and copy from it straight to the GPU. Regions are
// allocated first-fit, freed explicitly and zeroed when freed.
//
// The segment is a memfd: it has no name on any file system (nothing in /dev/shm), so no other
// process can open it, and it goes away with the last process holding its descriptor or a
// mapping of it, however the server ends.
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
#include "absl/types/span.h"
#include "retrieval/thread_pool.h"

namespace kvstar::server {

class SharedMemoryArena {
 public:
  // A memfd of `bytes` named `id` (as /proc/<pid>/maps shows it), with its pages reserved up
  // front so a lack of memory fails here instead of as SIGBUS later, mapped read-write into this
  // process and then sealed: F_SEAL_SHRINK and F_SEAL_GROW (a client's mapping of the whole
  // segment never faults), F_SEAL_FUTURE_WRITE (nobody can map it writable or write(2) to it
  // again: this process's mapping is the only writer) and F_SEAL_SEAL. RESOURCE_EXHAUSTED naming
  // the step when memory is short; FAILED_PRECONDITION when the kernel lacks memfd sealing
  // (Linux >= 5.1 is needed).
  static absl::StatusOr<std::unique_ptr<SharedMemoryArena>> Create(uint64_t bytes, std::string id);
  // Unmaps and closes the segment; clients' mappings keep its pages until they unmap them.
  ~SharedMemoryArena();
  SharedMemoryArena(const SharedMemoryArena&) = delete;
  SharedMemoryArena& operator=(const SharedMemoryArena&) = delete;

  // Offset of `bytes` free bytes (64-byte aligned), or nullopt when no free range is that large.
  // A region Allocate gives holds zeros.
  std::optional<uint64_t> Allocate(uint64_t bytes);
  // Zeroes the region that Allocate gave at `offset` and returns it, so no later reader of the
  // segment sees what it held. An offset Allocate did not give changes nothing.
  void Free(uint64_t offset) { Free(absl::MakeConstSpan(&offset, 1), nullptr); }
  // Free for many regions at once, zeroed in parallel on `pool` (on this thread when null): a
  // retrieval's regions are hundreds of MB. The lock is taken twice in all, not across zeroing.
  void Free(absl::Span<const uint64_t> offsets, retrieval::ThreadPool* pool);

  char* base() const { return base_; }
  uint64_t size() const { return size_; }
  // What SharedMemoryRef.segment names: "kvstar-<tenant>-<16 random hex digits>".
  const std::string& id() const { return id_; }
  // The memfd, for handing to clients (SCM_RIGHTS); owned by the arena.
  int fd() const { return fd_; }
  uint64_t free_bytes() const;

 private:
  SharedMemoryArena(std::string id, int fd, char* base, uint64_t size);
  // Puts a zeroed region back, coalescing it with its free neighbours.
  void ReturnLocked(uint64_t offset, uint64_t length) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string id_;
  const int fd_;
  char* const base_;
  const uint64_t size_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, uint64_t> free_ ABSL_GUARDED_BY(mu_);       // offset -> length
  std::map<uint64_t, uint64_t> allocated_ ABSL_GUARDED_BY(mu_);  // offset -> length
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_
