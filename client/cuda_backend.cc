// The CUDA backend (runtime API only, no kernels) and the start-up choice between it and the host
// backend.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/device_backend.h"
#include "spdlog/spdlog.h"

namespace kvstar::client_internal {
namespace {

absl::Status CudaError(cudaError_t error, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(error), " (",
                                          cudaGetErrorString(error), ")"));
}

class CudaBackend : public DeviceBackend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  ~CudaBackend() override {
    absl::MutexLock lock(&mu_);
    for (cudaEvent_t event : free_events_) cudaEventDestroy(event);
  }

  BackendKind kind() const override { return BackendKind::kCuda; }

  absl::StatusOr<void*> AllocDevice(uint64_t bytes) override {
    cudaSetDevice(device_);
    void* ptr = nullptr;
    cudaError_t error = cudaMalloc(&ptr, bytes);
    if (error != cudaSuccess) return CudaError(error, "cudaMalloc");
    return ptr;
  }
  void FreeDevice(void* ptr) override { cudaFree(ptr); }

  absl::StatusOr<void*> AllocPinned(uint64_t bytes) override {
    void* ptr = nullptr;
    cudaError_t error = cudaMallocHost(&ptr, bytes);
    if (error != cudaSuccess) return CudaError(error, "cudaMallocHost");
    return ptr;
  }
  void FreePinned(void* ptr) override { cudaFreeHost(ptr); }

  absl::StatusOr<StreamHandle> CreateStream() override {
    cudaSetDevice(device_);
    cudaStream_t stream = nullptr;
    cudaError_t error = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (error != cudaSuccess) return CudaError(error, "cudaStreamCreateWithFlags");
    return static_cast<StreamHandle>(stream);
  }
  void DestroyStream(StreamHandle stream) override {
    if (stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  }

  absl::Status CopyToDeviceBatch(const CopySegment* segments, size_t count,
                                 StreamHandle stream) override {
    if (count == 0) return absl::OkStatus();
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    Coalesce(segments, count, &dsts, &srcs, &sizes);
    cudaMemcpyAttributes attributes = {};
    attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attributes.srcLocHint.type = cudaMemLocationTypeHost;
    attributes.dstLocHint.type = cudaMemLocationTypeDevice;
    attributes.dstLocHint.id = device_;
    size_t attribute_index = 0;
    cudaError_t error =
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attributes,
                             &attribute_index, 1, static_cast<cudaStream_t>(stream));
    if (error == cudaSuccess) return absl::OkStatus();
    // Drivers without batched copies: one async copy per coalesced run.
    cudaGetLastError();
    for (size_t i = 0; i < dsts.size(); ++i) {
      error = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyHostToDevice,
                              static_cast<cudaStream_t>(stream));
      if (error != cudaSuccess) return CudaError(error, "cudaMemcpyAsync (batch fallback)");
    }
    return absl::OkStatus();
  }

  absl::Status Copy(void* dst, MemoryKind dst_kind, const void* src, MemoryKind src_kind,
                    size_t bytes, StreamHandle stream) override {
    if (dst_kind == MemoryKind::kHost && src_kind == MemoryKind::kHost) {
      std::memcpy(dst, src, bytes);
      return absl::OkStatus();
    }
    cudaError_t error =
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream));
    if (error != cudaSuccess) return CudaError(error, "cudaMemcpyAsync");
    return absl::OkStatus();
  }

  absl::StatusOr<EventHandle> RecordEvent(StreamHandle stream) override {
    cudaEvent_t event = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (!free_events_.empty()) {
        event = free_events_.back();
        free_events_.pop_back();
      }
    }
    if (event == nullptr) {
      cudaError_t error = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
      if (error != cudaSuccess) return CudaError(error, "cudaEventCreateWithFlags");
    }
    cudaError_t error = cudaEventRecord(event, static_cast<cudaStream_t>(stream));
    if (error != cudaSuccess) {
      ReleaseEvent(event);
      return CudaError(error, "cudaEventRecord");
    }
    return static_cast<EventHandle>(event);
  }
  bool EventDone(EventHandle event) override {
    return event == nullptr ||
           cudaEventQuery(static_cast<cudaEvent_t>(event)) != cudaErrorNotReady;
  }
  absl::Status WaitEvent(EventHandle event) override {
    if (event == nullptr) return absl::OkStatus();
    cudaError_t error = cudaEventSynchronize(static_cast<cudaEvent_t>(event));
    if (error != cudaSuccess) return CudaError(error, "cudaEventSynchronize");
    return absl::OkStatus();
  }
  absl::Status StreamWaitEvent(StreamHandle stream, EventHandle event) override {
    if (event == nullptr) return absl::OkStatus();
    cudaError_t error = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream),
                                            static_cast<cudaEvent_t>(event), 0);
    if (error != cudaSuccess) return CudaError(error, "cudaStreamWaitEvent");
    return absl::OkStatus();
  }
  void ReleaseEvent(EventHandle event) override {
    if (event == nullptr) return;
    absl::MutexLock lock(&mu_);
    free_events_.push_back(static_cast<cudaEvent_t>(event));
  }

 private:
  // Joins segments whose source and destination both continue the previous one: slots allocated
  // in order and staged in order become one large copy.
  static void Coalesce(const CopySegment* segments, size_t count, std::vector<void*>* dsts,
                       std::vector<const void*>* srcs, std::vector<size_t>* sizes) {
    for (size_t i = 0; i < count; ++i) {
      const CopySegment& segment = segments[i];
      if (!dsts->empty() &&
          static_cast<char*>(dsts->back()) + sizes->back() == segment.dst &&
          static_cast<const char*>(srcs->back()) + sizes->back() == segment.src) {
        sizes->back() += segment.bytes;
        continue;
      }
      dsts->push_back(segment.dst);
      srcs->push_back(segment.src);
      sizes->push_back(segment.bytes);
    }
  }

  const int device_;
  absl::Mutex mu_;
  std::vector<cudaEvent_t> free_events_ ABSL_GUARDED_BY(mu_);
};

absl::Status ProbeCuda(int cuda_device) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) return CudaError(error, "cudaGetDeviceCount");
  if (count == 0) return absl::UnavailableError("no CUDA device");
  if (cuda_device < 0 || cuda_device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_device ", cuda_device, " out of range: ", count, " devices"));
  }
  error = cudaSetDevice(cuda_device);
  if (error != cudaSuccess) return CudaError(error, "cudaSetDevice");
  // Pinned allocation fails on its own on some broken set-ups: probe it too.
  void* pinned = nullptr;
  error = cudaMallocHost(&pinned, 4096);
  if (error != cudaSuccess) return CudaError(error, "cudaMallocHost");
  cudaFreeHost(pinned);
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaUsable(int cuda_device) {
  static absl::Mutex mu(absl::kConstInit);
  static bool probed = false;
  static int probed_device = 0;
  static absl::Status* result = nullptr;
  absl::MutexLock lock(&mu);
  if (!probed || probed_device != cuda_device) {
    delete result;
    result = new absl::Status(ProbeCuda(cuda_device));
    cudaGetLastError();  // a failed probe must not leave a sticky error behind
    probed = true;
    probed_device = cuda_device;
  }
  return *result;
}

absl::StatusOr<std::unique_ptr<DeviceBackend>> SelectBackend(BackendKind requested,
                                                             int cuda_device) {
  static std::once_flag logged;
  if (requested == BackendKind::kHost) {
    std::call_once(logged, [] { spdlog::info("kvstar client: host-memory backend (requested)"); });
    return MakeHostBackend();
  }
  absl::Status usable = CudaUsable(cuda_device);
  if (usable.ok()) {
    std::call_once(logged, [cuda_device] {
      spdlog::info("kvstar client: CUDA backend on device {}", cuda_device);
    });
    return std::unique_ptr<DeviceBackend>(std::make_unique<CudaBackend>(cuda_device));
  }
  if (requested == BackendKind::kCuda) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA backend requested but CUDA is unusable: ", usable.message()));
  }
  std::call_once(logged, [&usable] {
    spdlog::warn("kvstar client: CUDA unusable ({}); using the host-memory backend",
                 std::string(usable.message()));
  });
  return MakeHostBackend();
}

}  // namespace kvstar::client_internal
