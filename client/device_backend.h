// DeviceBackend: the memory and copy operations the client needs from a GPU, behind one interface
// so the same scheduler runs on CUDA and, without a usable GPU, on host memory.
//
// Streams and events are opaque pointers (cudaStream_t / cudaEvent_t on CUDA). On the host backend
// every copy is done when the call returns, and events are always complete.
// Thread-safe: any method from any thread.
#ifndef KVSTAR_CLIENT_DEVICE_BACKEND_H_
#define KVSTAR_CLIENT_DEVICE_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstar/client.h"

namespace kvstar::client_internal {

using StreamHandle = void*;
using EventHandle = void*;

// One host->device copy of a batch.
struct CopySegment {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual BackendKind kind() const = 0;

  virtual absl::StatusOr<void*> AllocDevice(uint64_t bytes) = 0;
  virtual void FreeDevice(void* ptr) = 0;
  // Page-locked host memory (plain host memory on the host backend).
  virtual absl::StatusOr<void*> AllocPinned(uint64_t bytes) = 0;
  virtual void FreePinned(void* ptr) = 0;
  // Page-locks host memory the library did not allocate (the server's mapped shared-memory
  // segment), so async copies read it like pinned memory. `read_only`: the mapping is PROT_READ.
  // A no-op on the host backend. REQUIRES: UnregisterHost(ptr) before the memory is unmapped.
  virtual absl::Status RegisterHost(void* ptr, uint64_t bytes, bool read_only) = 0;
  virtual void UnregisterHost(void* ptr) = 0;

  // A stream that does not synchronize with the legacy default stream.
  virtual absl::StatusOr<StreamHandle> CreateStream() = 0;
  virtual void DestroyStream(StreamHandle stream) = 0;

  // Copies `count` scattered segments from pinned host memory to device memory. Segments whose
  // sources are contiguous (one staging buffer) and that are small travel as bulk copies into a
  // device landing buffer kept per stream, then one kernel scatters them to their destinations;
  // large ones go straight (cudaMemcpyBatchAsync). See scatter_plan.h. The sources must stay
  // untouched and the destinations unread until the stream passes this point (record an event).
  // Calls on one stream from several threads are serialized.
  virtual absl::Status CopyToDeviceBatch(const CopySegment* segments, size_t count,
                                         StreamHandle stream) = 0;
  // One async copy; `kind` says where src and dst live.
  virtual absl::Status Copy(void* dst, MemoryKind dst_kind, const void* src, MemoryKind src_kind,
                            size_t bytes, StreamHandle stream) = 0;

  // Records an event on `stream`; nullptr on the host backend (always complete).
  virtual absl::StatusOr<EventHandle> RecordEvent(StreamHandle stream) = 0;
  // True once the work before the event completed. Errors count as complete (they surface in
  // copies).
  virtual bool EventDone(EventHandle event) = 0;
  virtual absl::Status WaitEvent(EventHandle event) = 0;
  // Makes later work on `stream` wait for `event`.
  virtual absl::Status StreamWaitEvent(StreamHandle stream, EventHandle event) = 0;
  // Returns the event to the backend's pool. nullptr is ignored.
  virtual void ReleaseEvent(EventHandle event) = 0;
};

// The host-memory backend.
std::unique_ptr<DeviceBackend> MakeHostBackend();

struct ScatterPlanOptions;
// A CUDA backend on `cuda_device` whose scattered copies are planned with `options` (tests and the
// transfer benchmark force one path with it). REQUIRES: CudaUsable(cuda_device) is OK.
std::unique_ptr<DeviceBackend> MakeCudaBackend(int cuda_device, const ScatterPlanOptions& options);

// kHost: the host backend. kCuda: CUDA on `cuda_device`, or an error saying why CUDA is unusable.
// kAuto: CUDA when usable, else the host backend. Logs the backend chosen (and why) once per
// process.
absl::StatusOr<std::unique_ptr<DeviceBackend>> SelectBackend(BackendKind requested,
                                                             int cuda_device);

// Why CUDA is unusable on this machine (OK when it is usable). Probes once per process.
absl::Status CudaUsable(int cuda_device);

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_DEVICE_BACKEND_H_
