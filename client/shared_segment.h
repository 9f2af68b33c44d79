// SharedSegment: this client's tenant's shared-memory segment, received from the server over its
// handoff socket (GetServerInfo.shared_memory_socket) after the server checked the bearer token,
// mapped read-only into this process for the co-located data plane and registered with the
// device backend so copies from it go straight to the GPU. Retrieve replies then name regions of
// it (SharedMemoryRef: K at `offset`, V right after, `length` bytes each) by its id.
//
// The segment is a memfd the server sealed against shrinking, growing and new writable mappings:
// nobody but the server writes it, and this mapping never faults on a shrunk segment.
//
// Thread-safe: immutable after Receive.
#ifndef KVSTAR_CLIENT_SHARED_SEGMENT_H_
#define KVSTAR_CLIENT_SHARED_SEGMENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/device_backend.h"

namespace kvstar::client_internal {

// What the shared-memory handshake gave: the segment's descriptor (the caller owns it), its id
// and size.
struct ReceivedSegment {
  int fd = -1;
  std::string id;
  uint64_t bytes = 0;
};

// The handshake of kvstar.proto (SharedMemoryHandshakeRequest) on `socket_address` ("@name":
// abstract namespace; else a path), sending `bearer_token` (empty: none). The server's refusal
// comes back with its code and message (UNAUTHENTICATED for a wrong or missing token,
// RESOURCE_EXHAUSTED when no room is left for the tenant); UNAVAILABLE when the socket cannot be
// reached or the answer is cut short; DATA_LOSS for an answer without a descriptor or of the
// wrong size, or a descriptor not sealed against shrinking.
absl::StatusOr<ReceivedSegment> ReceiveSegment(const std::string& socket_address,
                                               const std::string& bearer_token, int timeout_ms);

class SharedSegment {
 public:
  // ReceiveSegment, then mmap of the whole segment PROT_READ / MAP_SHARED and
  // backend->RegisterHost. Errors name the step that failed.
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Receive(const std::string& socket_address,
                                                                const std::string& bearer_token,
                                                                int timeout_ms,
                                                                DeviceBackend* backend);
  ~SharedSegment();  // unregisters and unmaps; REQUIRES: no copy from it is still in flight
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  // The segment's id, as SharedMemoryRef.segment names it.
  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  // The read-only mapping of the whole segment.
  const char* base() const { return base_; }
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
