// SharedMemoryArena: one tenant's shared-memory segment, which the server fills with block bytes
// for that tenant's co-located clients; they receive its descriptor over the segment handoff
// (server/segment_handoff.h), map it read-only and copy from it straight to the GPU. Regions are
// allocated first-fit and given back explicitly: zeroed (Free) when what they held must not be read
// again, or as they are (Release), tagged with an owner, when the tenant may go on reading them
// (a live sequence's blocks); ZeroReleased zeroes what an owner released and nobody reused (its
// sequence was dropped). Every byte of a region is written before it is handed out again.
//
// The segment is a memfd: it has no name on any file system (nothing in /dev/shm), so no other
// process can open it, and it goes away with the last process holding its descriptor or a
// mapping of it, however the server ends.
//
// Thread-safe.
#ifndef KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_
#define KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "retrieval/thread_pool.h"

namespace kvstar::server {

// Copies `bytes` into a segment with streaming (non-temporal) stores where the CPU has them: a
// segment's bytes are next read by a GPU's DMA engine, not by this CPU, so they bypass the caches
// and cost no read-for-ownership. Ordered before this thread's later stores (a fence).
void CopyToSegment(char* to, const char* from, size_t bytes);

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
  // The region holds zeros or bytes that this tenant's released regions held: the caller writes
  // all `bytes` of it before anyone is told of it. The alignment padding past them is zeroed.
  std::optional<uint64_t> Allocate(uint64_t bytes);
  // Zeroes the region that Allocate gave at `offset` and returns it, so no later reader of the
  // segment sees what it held. An offset Allocate did not give changes nothing.
  void Free(uint64_t offset) { Free(absl::MakeConstSpan(&offset, 1), nullptr); }
  // Free for many regions at once, zeroed in parallel on `pool` (on this thread when null): a
  // retrieval's regions are hundreds of MB. The lock is taken twice in all, not across zeroing.
  void Free(absl::Span<const uint64_t> offsets, retrieval::ThreadPool* pool);
  // Returns regions without clearing them, for bytes the segment's tenant may read anyway (a live
  // sequence's blocks, which GetBlocks also serves it): they stay readable through the segment
  // until an allocation overwrites them or ZeroReleased(owner) clears them. A retrieval's
  // regions are a GB or more; not zeroing them saves a pass over host memory per retrieval.
  // Unknown offsets are ignored. REQUIRES: owner != 0.
  void Release(absl::Span<const uint64_t> offsets, uint64_t owner);
  // Zeroes every free range that `owner`'s Release left uncleared (what was reused since is
  // another block's now), on `pool` (this thread when null).
  void ZeroReleased(uint64_t owner, retrieval::ThreadPool* pool);

  char* base() const { return base_; }
  uint64_t size() const { return size_; }
  // What SharedMemoryRef.segment names: "kvstar-<tenant>-<16 random hex digits>".
  const std::string& id() const { return id_; }
  // The memfd, for handing to clients (SCM_RIGHTS); owned by the arena.
  int fd() const { return fd_; }
  uint64_t free_bytes() const;

 private:
  SharedMemoryArena(std::string id, int fd, char* base, uint64_t size);
  // A free range: its length, and whose released bytes it holds (kZeroed: zeros).
  struct FreeRange {
    uint64_t length = 0;
    uint64_t owner = 0;
  };
  static constexpr uint64_t kZeroed = 0;

  // Zeroes regions that are neither allocated nor free, then returns them as zeroed.
  void ZeroAndReturn(const std::vector<std::pair<uint64_t, uint64_t>>& regions,
                     retrieval::ThreadPool* pool) ABSL_LOCKS_EXCLUDED(mu_);
  // Puts a region back, coalescing it with its free neighbours of the same owner.
  void ReturnLocked(uint64_t offset, uint64_t length, uint64_t owner)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string id_;
  const int fd_;
  char* const base_;
  const uint64_t size_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, FreeRange> free_ ABSL_GUARDED_BY(mu_);      // by offset
  std::map<uint64_t, uint64_t> allocated_ ABSL_GUARDED_BY(mu_);  // offset -> length
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_SHARED_MEMORY_ARENA_H_
