#include "server/tenant_segments.h"

#include <algorithm>
#include <chrono>
#include <fstream>

#include "absl/base/macros.h"
#include "absl/strings/str_cat.h"

namespace kvstar::server {
namespace {

// Sizes stay multiples of a page, so every segment maps whole.
constexpr uint64_t kPageBytes = 4096;

// A fresh id per segment: a client holding a restarted server's old segment never mistakes the
// new segment's regions for its own.
std::string SegmentId(absl::string_view tenant) {
  uint64_t bits = 0;
  std::ifstream("/dev/urandom", std::ios::binary)
      .read(reinterpret_cast<char*>(&bits), sizeof(bits));
  bits ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return absl::StrCat("kvstar-", tenant, "-", absl::Hex(bits, absl::kZeroPad16));
}

}  // namespace

TenantSegments::TenantSegments(uint64_t total_bytes, uint64_t bytes_per_tenant)
    : total_bytes_(total_bytes), bytes_per_tenant_(bytes_per_tenant) {
  ABSL_ASSERT(total_bytes > 0 && bytes_per_tenant > 0);
}

uint64_t TenantSegments::Allotment() const {
  const uint64_t left = total_bytes_ - std::min(allotted_bytes_, total_bytes_);
  return std::min(bytes_per_tenant_, left) / kPageBytes * kPageBytes;
}

absl::StatusOr<SharedMemoryArena*> TenantSegments::Obtain(absl::string_view tenant) {
  absl::MutexLock lock(&mu_);
  auto found = segments_.find(tenant);
  if (found != segments_.end()) return found->second.get();
  const uint64_t bytes = Allotment();
  if (bytes == 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "no shared memory left for tenant ", tenant, ": the segments of ", segments_.size(),
        " other tenants hold all ", total_bytes_, " bytes of --shared_memory_bytes"));
  }
  absl::StatusOr<std::unique_ptr<SharedMemoryArena>> created =
      SharedMemoryArena::Create(bytes, SegmentId(tenant));
  if (!created.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat("the shared-memory segment of tenant ", tenant,
                                                     ": ", created.status().message()));
  }
  allotted_bytes_ += bytes;
  SharedMemoryArena* arena = created->get();
  segments_.emplace(std::string(tenant), *std::move(created));
  return arena;
}

SharedMemoryArena* TenantSegments::Find(absl::string_view tenant) const {
  absl::MutexLock lock(&mu_);
  auto found = segments_.find(tenant);
  return found != segments_.end() ? found->second.get() : nullptr;
}

uint64_t TenantSegments::BytesFor(absl::string_view tenant) const {
  absl::MutexLock lock(&mu_);
  auto found = segments_.find(tenant);
  return found != segments_.end() ? found->second->size() : Allotment();
}

uint64_t TenantSegments::allotted_bytes() const {
  absl::MutexLock lock(&mu_);
  return allotted_bytes_;
}

}  // namespace kvstar::server
