// StagingPool: pinned host buffers under a byte budget, reused by size. Offloads stage device bytes
// here before they are serialized; loads stage reply bytes here before the host->device copy.
// Thread-safe.
#ifndef KVSTAR_CLIENT_STAGING_POOL_H_
#define KVSTAR_CLIENT_STAGING_POOL_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "client/device_backend.h"

namespace kvstar::client_internal {

class StagingPool {
 public:
  StagingPool(DeviceBackend* backend, uint64_t budget_bytes);
  ~StagingPool();  // REQUIRES: every buffer was released
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // A buffer of at least `bytes` (an idle one of up to twice that is reused). Waits while the
  // budget is used by buffers in use; idle buffers that do not fit are freed to make room.
  // RESOURCE_EXHAUSTED when `bytes` exceeds the whole budget.
  absl::StatusOr<void*> Acquire(uint64_t bytes);
  // Like Acquire, but UNAVAILABLE instead of waiting.
  absl::StatusOr<void*> TryAcquire(uint64_t bytes);
  void Release(void* buffer);

  uint64_t bytes_in_use() const;

 private:
  absl::StatusOr<void*> AcquireLocked(uint64_t bytes, bool* must_wait)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  DeviceBackend* const backend_;
  const uint64_t budget_bytes_;
  mutable absl::Mutex mu_;
  uint64_t allocated_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t in_use_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<void*, uint64_t> sizes_ ABSL_GUARDED_BY(mu_);
  std::multimap<uint64_t, void*> idle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_STAGING_POOL_H_
