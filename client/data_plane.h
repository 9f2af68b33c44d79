// BlockDataPlane: how the bytes of the blocks a Retrieve (or GetBlocks) reply brings reach a copy
// into slots. One interface, two implementations:
// - gRPC bytes (grpc_bytes_data_plane.cc): K and V travel in the message; they are staged in
//   pinned memory before the host->device copy.
// - shared memory (shared_memory_data_plane.cc): for a client on the server's host, blocks come
//   as regions of its tenant's segment, received over the server's socket, mapped read-only
//   (and registered with the device backend), and are copied from there straight into slots.
//   Blocks that did not fit the segment still come as bytes and are handled as above.
// Both give bit-identical slots. The client chooses one per server (kvstar/client.h, "Data
// planes"); a plane lives as long as a copy from it may be in flight (shared_ptr).
//
// Thread-safe: immutable after construction.
#ifndef KVSTAR_CLIENT_DATA_PLANE_H_
#define KVSTAR_CLIENT_DATA_PLANE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/shared_segment.h"
#include "kvstar/client.h"
#include "kvstar/v1/kvstar.pb.h"

namespace kvstar::client_internal {

class BlockDataPlane {
 public:
  virtual ~BlockDataPlane() = default;

  // kSharedMemory or kGrpcBytes.
  virtual DataPlane kind() const = 0;
  // The mapped segment's name; "" for gRPC bytes.
  virtual const std::string& segment_name() const = 0;
  // Whether a Retrieve should ask the server for shared-memory regions.
  bool wants_shared_memory() const { return kind() == DataPlane::kSharedMemory; }

  // True when `block` can be read as it came: bytes in the message, or a region of this plane's
  // segment. False for a region of a segment this client has not received (the server
  // restarted, or a reply that is not this tenant's): fetch it again as bytes (GetBlocks).
  virtual bool Readable(const v1::Block& block) const = 0;

  // Where K then V of `block` (`key_bytes` each, contiguous) lie for a direct copy into a slot,
  // or nullptr when they are bytes in the message, to be staged. DATA_LOSS naming the block when
  // its sizes or its region do not fit. REQUIRES: Readable(block).
  virtual absl::StatusOr<const char*> Locate(const v1::Block& block, uint64_t key_bytes) const = 0;
};

// Checks the K/V sizes of a block that came as bytes: DATA_LOSS naming it when they are not
// `key_bytes` each. Shared by both planes.
absl::Status CheckBlockBytes(const v1::Block& block, uint64_t key_bytes);

// The gRPC-bytes plane (one instance serves everyone).
std::shared_ptr<const BlockDataPlane> GrpcBytesDataPlane();

// The shared-memory plane over `segment` (mapped and registered; unmapped with the plane).
std::shared_ptr<const BlockDataPlane> MakeSharedMemoryDataPlane(
    std::unique_ptr<SharedSegment> segment);

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_DATA_PLANE_H_
