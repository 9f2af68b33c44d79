// The CUDA backend (runtime API plus the scatter kernel) and the start-up choice between it and
// the host backend.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/device_backend.h"
#include "client/scatter_kernel.h"
#include "client/scatter_plan.h"
#include "spdlog/spdlog.h"

namespace kvstar::client_internal {
namespace {

absl::Status CudaError(cudaError_t error, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

class CudaBackend : public DeviceBackend {
 public:
  CudaBackend(int device, const ScatterPlanOptions& options) : device_(device), options_(options) {}
  ~CudaBackend() override {
    std::vector<StreamHandle> streams;
    {
      absl::MutexLock lock(&mu_);
      for (cudaEvent_t event : free_events_) cudaEventDestroy(event);
      for (const auto& [stream, landing] : landings_) streams.push_back(stream);
    }
    for (StreamHandle stream : streams) FreeLanding(stream);
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

  absl::Status RegisterHost(void* ptr, uint64_t bytes, bool read_only) override {
    cudaSetDevice(device_);
    unsigned int flags = cudaHostRegisterDefault;
#ifdef cudaHostRegisterReadOnly
    // Without it, registering a PROT_READ mapping fails (the driver pins pages for writing).
    if (read_only) flags |= cudaHostRegisterReadOnly;
#endif
    cudaError_t error = cudaHostRegister(ptr, bytes, flags);
    if (error != cudaSuccess) {
      cudaGetLastError();  // not sticky, but leave no error behind for the next call to report
      return CudaError(error, read_only ? "cudaHostRegister (read-only)" : "cudaHostRegister");
    }
    return absl::OkStatus();
  }
  void UnregisterHost(void* ptr) override {
    cudaSetDevice(device_);
    cudaHostUnregister(ptr);
  }

  absl::StatusOr<StreamHandle> CreateStream() override {
    cudaSetDevice(device_);
    cudaStream_t stream = nullptr;
    cudaError_t error = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (error != cudaSuccess) return CudaError(error, "cudaStreamCreateWithFlags");
    return static_cast<StreamHandle>(stream);
  }
  void DestroyStream(StreamHandle stream) override {
    FreeLanding(stream);
    if (stream != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  }

  absl::Status CopyToDeviceBatch(const CopySegment* segments, size_t count,
                                 StreamHandle stream) override {
    if (count == 0) return absl::OkStatus();
    const ScatterPlan plan = PlanScatteredCopy(absl::MakeConstSpan(segments, count), options_);
    if (absl::Status status = CopyBatch(plan.direct, stream); !status.ok()) return status;
    if (plan.rounds.empty()) return absl::OkStatus();
    absl::StatusOr<Landing*> landing = LandingFor(stream);
    if (!landing.ok()) return landing.status();
    // Held until the last scatter is enqueued: stream order then keeps another caller's landing
    // copies behind this call's scatters.
    absl::MutexLock landing_lock(&(*landing)->mu);
    if (absl::Status status = GrowLanding(**landing, plan.landing_bytes, stream); !status.ok()) {
      return status;
    }
    const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    char* const base = static_cast<char*>((*landing)->device);
    std::vector<CopySegment> landed;
    for (const ScatterRound& round : plan.rounds) {
      // One driver call for the round's copies: blocks whose sources lie apart (regions of a
      // shared-memory segment) cost a driver call each otherwise, about as long as the copy.
      landed.clear();
      for (const LandingCopy& copy : round.copies) {
        landed.push_back({base + copy.landing_offset, copy.src, copy.bytes});
      }
      if (absl::Status status = CopyBatch(landed, stream); !status.ok()) return status;
      ScatterKernelArgs args;
      args.landing = base;
      for (size_t i = 0; i < round.pieces.size(); ++i) {
        const ScatterPiece& piece = round.pieces[i];
        args.pieces[args.count++] = {piece.dst, static_cast<uint32_t>(piece.landing_offset),
                                     static_cast<uint32_t>(piece.bytes)};
        args.max_bytes = std::max(args.max_bytes, static_cast<uint32_t>(piece.bytes));
        if (args.count == kMaxScatterPiecesPerLaunch || i + 1 == round.pieces.size()) {
          cudaError_t error = LaunchScatterKernel(args, cuda_stream);
          if (error != cudaSuccess) return CudaError(error, "scatter kernel launch");
          args.count = 0;
          args.max_bytes = 0;
        }
      }
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
    return event == nullptr || cudaEventQuery(static_cast<cudaEvent_t>(event)) != cudaErrorNotReady;
  }
  absl::Status WaitEvent(EventHandle event) override {
    if (event == nullptr) return absl::OkStatus();
    cudaError_t error = cudaEventSynchronize(static_cast<cudaEvent_t>(event));
    if (error != cudaSuccess) return CudaError(error, "cudaEventSynchronize");
    return absl::OkStatus();
  }
  absl::Status StreamWaitEvent(StreamHandle stream, EventHandle event) override {
    if (event == nullptr) return absl::OkStatus();
    cudaError_t error =
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0);
    if (error != cudaSuccess) return CudaError(error, "cudaStreamWaitEvent");
    return absl::OkStatus();
  }
  void ReleaseEvent(EventHandle event) override {
    if (event == nullptr) return;
    absl::MutexLock lock(&mu_);
    free_events_.push_back(static_cast<cudaEvent_t>(event));
  }

 private:
  // A device landing buffer of one stream (see CopyToDeviceBatch).
  struct Landing {
    absl::Mutex mu;
    void* device ABSL_GUARDED_BY(mu) = nullptr;
    size_t bytes ABSL_GUARDED_BY(mu) = 0;
  };

  // Host->device copies in stream order: one batched driver call, or one async copy each on
  // drivers without it.
  absl::Status CopyBatch(const std::vector<CopySegment>& direct, StreamHandle stream) {
    if (direct.empty()) return absl::OkStatus();
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    for (const CopySegment& segment : direct) {
      dsts.push_back(segment.dst);
      srcs.push_back(segment.src);
      sizes.push_back(segment.bytes);
    }
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
    cudaGetLastError();
    for (size_t i = 0; i < dsts.size(); ++i) {
      error = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyHostToDevice,
                              static_cast<cudaStream_t>(stream));
      if (error != cudaSuccess) return CudaError(error, "cudaMemcpyAsync (batch fallback)");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Landing*> LandingFor(StreamHandle stream) {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<Landing>& landing = landings_[stream];
    if (landing == nullptr) landing = std::make_unique<Landing>();
    return landing.get();
  }

  // Makes `landing` hold at least `bytes` (whole MiB, so slowly growing loads rarely reallocate).
  absl::Status GrowLanding(Landing& landing, size_t bytes, StreamHandle stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(landing.mu) {
    if (landing.bytes >= bytes) return absl::OkStatus();
    if (landing.device != nullptr) {
      // Earlier scatters on this stream may still read it.
      cudaError_t error = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
      if (error != cudaSuccess) return CudaError(error, "cudaStreamSynchronize (landing)");
      cudaFree(landing.device);
      landing.device = nullptr;
      landing.bytes = 0;
    }
    const size_t rounded = (bytes + (size_t{1} << 20) - 1) >> 20 << 20;
    cudaSetDevice(device_);
    cudaError_t error = cudaMalloc(&landing.device, rounded);
    if (error != cudaSuccess) {
      landing.device = nullptr;
      return CudaError(error, "cudaMalloc (landing buffer)");
    }
    landing.bytes = rounded;
    return absl::OkStatus();
  }

  void FreeLanding(StreamHandle stream) {
    std::unique_ptr<Landing> landing;
    {
      absl::MutexLock lock(&mu_);
      auto found = landings_.find(stream);
      if (found == landings_.end()) return;
      landing = std::move(found->second);
      landings_.erase(found);
    }
    absl::MutexLock landing_lock(&landing->mu);
    if (landing->device != nullptr) cudaFree(landing->device);  // waits for the device
  }

  const int device_;
  const ScatterPlanOptions options_;
  absl::Mutex mu_;
  std::vector<cudaEvent_t> free_events_ ABSL_GUARDED_BY(mu_);
  std::map<StreamHandle, std::unique_ptr<Landing>> landings_ ABSL_GUARDED_BY(mu_);
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

std::unique_ptr<DeviceBackend> MakeCudaBackend(int cuda_device, const ScatterPlanOptions& options) {
  return std::make_unique<CudaBackend>(cuda_device, options);
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
    return MakeCudaBackend(cuda_device, ScatterPlanOptions());
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
