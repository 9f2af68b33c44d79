// TenantSegments: the shared-memory segment of each tenant (SharedMemoryArena), under one budget
// for the whole node. A tenant's segment is created when a client of the tenant first asks for it
// (the segment handoff), with the tenant's allotment: `bytes_per_tenant`, or what is left of
// `total_bytes` when that is less. It then lives as long as the node (tenants are the fixed set
// of the token file). Retrieve replies of a tenant use only that tenant's segment, and only once
// it exists.
//
// Thread-safe.
#ifndef KVSTAR_SERVER_TENANT_SEGMENTS_H_
#define KVSTAR_SERVER_TENANT_SEGMENTS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/shared_memory_arena.h"

namespace kvstar::server {

class TenantSegments {
 public:
  // REQUIRES: bytes_per_tenant > 0 and total_bytes > 0.
  TenantSegments(uint64_t total_bytes, uint64_t bytes_per_tenant);

  // The tenant's segment, created on the first call. RESOURCE_EXHAUSTED when the other tenants'
  // segments took all of total_bytes, or when creating it failed (the message says why; a later
  // call tries again). The pointer stays valid for the life of this object.
  absl::StatusOr<SharedMemoryArena*> Obtain(absl::string_view tenant) ABSL_LOCKS_EXCLUDED(mu_);
  // The tenant's segment when it was created; else nullptr.
  SharedMemoryArena* Find(absl::string_view tenant) const ABSL_LOCKS_EXCLUDED(mu_);
  // Bytes of the tenant's segment: its size once created, else what Obtain would give now.
  uint64_t BytesFor(absl::string_view tenant) const ABSL_LOCKS_EXCLUDED(mu_);

  uint64_t total_bytes() const { return total_bytes_; }
  uint64_t bytes_per_tenant() const { return bytes_per_tenant_; }
  // Bytes of all segments created so far.
  uint64_t allotted_bytes() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  uint64_t Allotment() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t total_bytes_;
  const uint64_t bytes_per_tenant_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<SharedMemoryArena>> segments_
      ABSL_GUARDED_BY(mu_);
  uint64_t allotted_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_TENANT_SEGMENTS_H_
