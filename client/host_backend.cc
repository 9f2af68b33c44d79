// The host-memory backend: "device" memory is host memory and every copy is a memcpy finished
// before the call returns, so events are always complete (nullptr).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "client/device_backend.h"

namespace kvstar::client_internal {
namespace {

class HostBackend : public DeviceBackend {
 public:
  BackendKind kind() const override { return BackendKind::kHost; }

  absl::StatusOr<void*> AllocDevice(uint64_t bytes) override { return Allocate(bytes); }
  void FreeDevice(void* ptr) override { std::free(ptr); }
  absl::StatusOr<void*> AllocPinned(uint64_t bytes) override { return Allocate(bytes); }
  void FreePinned(void* ptr) override { std::free(ptr); }
  absl::Status RegisterHost(void*, uint64_t, bool) override { return absl::OkStatus(); }
  void UnregisterHost(void*) override {}

  absl::StatusOr<StreamHandle> CreateStream() override { return nullptr; }
  void DestroyStream(StreamHandle) override {}

  absl::Status CopyToDeviceBatch(const CopySegment* segments, size_t count, StreamHandle) override {
    for (size_t i = 0; i < count; ++i) {
      std::memcpy(segments[i].dst, segments[i].src, segments[i].bytes);
    }
    return absl::OkStatus();
  }
  absl::Status Copy(void* dst, MemoryKind, const void* src, MemoryKind, size_t bytes,
                    StreamHandle) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::StatusOr<EventHandle> RecordEvent(StreamHandle) override { return nullptr; }
  bool EventDone(EventHandle) override { return true; }
  absl::Status WaitEvent(EventHandle) override { return absl::OkStatus(); }
  absl::Status StreamWaitEvent(StreamHandle, EventHandle) override { return absl::OkStatus(); }
  void ReleaseEvent(EventHandle) override {}

 private:
  static absl::StatusOr<void*> Allocate(uint64_t bytes) {
    // 256-byte alignment, like cudaMalloc, so layouts behave the same on both backends.
    const uint64_t rounded = (std::max<uint64_t>(bytes, 1) + 255) / 256 * 256;
    void* ptr = std::aligned_alloc(256, rounded);
    if (ptr == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("host backend: cannot allocate ", bytes, " bytes"));
    }
    return ptr;
  }
};

}  // namespace

std::unique_ptr<DeviceBackend> MakeHostBackend() { return std::make_unique<HostBackend>(); }

}  // namespace kvstar::client_internal
