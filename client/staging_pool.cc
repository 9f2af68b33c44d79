#include "client/staging_pool.h"

#include "absl/strings/str_cat.h"

namespace kvstar::client_internal {

StagingPool::StagingPool(DeviceBackend* backend, uint64_t budget_bytes)
    : backend_(backend), budget_bytes_(budget_bytes) {}

StagingPool::~StagingPool() {
  absl::MutexLock lock(&mu_);
  for (const auto& [buffer, bytes] : sizes_) backend_->FreePinned(buffer);
}

absl::StatusOr<void*> StagingPool::AcquireLocked(uint64_t bytes, bool* must_wait) {
  *must_wait = false;
  if (bytes > budget_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("staging: ", bytes, " bytes exceed the staging budget of ", budget_bytes_));
  }
  // The smallest idle buffer that fits, if it wastes at most half of itself: loads vary in size,
  // and a pinned allocation (or a free, which waits for the device) costs milliseconds on the
  // retrieval path.
  auto idle = idle_.lower_bound(bytes);
  if (idle != idle_.end() && idle->first <= 2 * bytes) {
    void* buffer = idle->second;
    in_use_bytes_ += idle->first;
    idle_.erase(idle);
    return buffer;
  }
  // Free idle buffers of other sizes until the new one fits.
  while (allocated_bytes_ + bytes > budget_bytes_ && !idle_.empty()) {
    auto victim = idle_.begin();
    backend_->FreePinned(victim->second);
    allocated_bytes_ -= victim->first;
    sizes_.erase(victim->second);
    idle_.erase(victim);
  }
  if (allocated_bytes_ + bytes > budget_bytes_) {
    *must_wait = true;
    return absl::UnavailableError("staging budget in use");
  }
  absl::StatusOr<void*> buffer = backend_->AllocPinned(bytes);
  if (!buffer.ok()) return buffer.status();
  allocated_bytes_ += bytes;
  in_use_bytes_ += bytes;
  sizes_[*buffer] = bytes;
  return buffer;
}

absl::StatusOr<void*> StagingPool::Acquire(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  while (true) {
    bool must_wait = false;
    absl::StatusOr<void*> buffer = AcquireLocked(bytes, &must_wait);
    if (!must_wait) return buffer;
    // Wait until some buffer in use comes back.
    struct Progress {
      const StagingPool* pool;
      uint64_t in_use;
    } progress{this, in_use_bytes_};
    mu_.Await(absl::Condition(
        +[](Progress* p)
             ABSL_NO_THREAD_SAFETY_ANALYSIS { return p->pool->in_use_bytes_ < p->in_use; },
        &progress));
  }
}

absl::StatusOr<void*> StagingPool::TryAcquire(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  bool must_wait = false;
  return AcquireLocked(bytes, &must_wait);
}

void StagingPool::Release(void* buffer) {
  absl::MutexLock lock(&mu_);
  auto size = sizes_.find(buffer);
  if (size == sizes_.end()) return;
  in_use_bytes_ -= size->second;
  idle_.emplace(size->second, buffer);
}

uint64_t StagingPool::bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_bytes_;
}

}  // namespace kvstar::client_internal
