// SharedSegment: the server's shared-memory segment (GetServerInfo.shared_memory_segment) mapped
// read-only into this process for the co-located data plane, and registered with the device
// backend so copies from it go straight to the GPU. Retrieve replies then name regions of it
// (SharedMemoryRef: K at `offset`, V right after, `length` bytes each).
//
// Thread-safe: immutable after Map.
#ifndef KVSTAR_CLIENT_SHARED_SEGMENT_H_
#define KVSTAR_CLIENT_SHARED_SEGMENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/device_backend.h"

namespace kvstar::client_internal {

class SharedSegment {
 public:
  // shm_open(name, O_RDONLY) and mmap of `bytes` (the object must be at least that large), then
  // backend->RegisterHost. Errors name the step that failed and errno's text.
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Map(const std::string& name, uint64_t bytes,
                                                            DeviceBackend* backend);
  ~SharedSegment();  // unregisters and unmaps; REQUIRES: no copy from it is still in flight
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  // K then V of the region at `offset`, `length` bytes each; nullptr when the region does not lie
  // inside the segment.
  const char* Region(uint64_t offset, uint64_t length) const;

 private:
  SharedSegment(std::string name, char* base, uint64_t size, DeviceBackend* backend);

  const std::string name_;
  char* const base_;
  const uint64_t size_;
  DeviceBackend* const backend_;
};

// This host's identity as kvstar servers report it (GetServerInfo.host_id): the kernel's boot id.
absl::StatusOr<std::string> ThisHostId();

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_SHARED_SEGMENT_H_
