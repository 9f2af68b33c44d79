// The scatter kernel: copies pieces of a device landing buffer to their device destinations with
// 16-byte vector loads and stores. Compiled by nvcc (scatter_kernel.cu); called from the CUDA
// backend, which is compiled by the host compiler: this header is plain C++ for both.
#ifndef KVSTAR_CLIENT_SCATTER_KERNEL_H_
#define KVSTAR_CLIENT_SCATTER_KERNEL_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace kvstar::client_internal {

// Pieces per launch: the arguments travel by value in the launch (kernel parameters, < 4 KiB),
// so nothing needs to stay alive after the call and no descriptor copy is issued.
constexpr uint32_t kMaxScatterPiecesPerLaunch = 240;

struct ScatterKernelPiece {
  void* dst = nullptr;
  uint32_t landing_offset = 0;
  uint32_t bytes = 0;
};

struct ScatterKernelArgs {
  const char* landing = nullptr;
  uint32_t count = 0;      // pieces used, <= kMaxScatterPiecesPerLaunch
  uint32_t max_bytes = 0;  // of the largest piece: sizes the grid
  ScatterKernelPiece pieces[kMaxScatterPiecesPerLaunch];
};

static_assert(sizeof(ScatterKernelArgs) <= 4000, "kernel parameters are limited to 4 KiB");

// Enqueues one scatter of args.pieces on `stream`. Returns the launch's error (cudaSuccess when
// enqueued; execution errors surface on the stream like those of copies).
cudaError_t LaunchScatterKernel(const ScatterKernelArgs& args, cudaStream_t stream);

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_SCATTER_KERNEL_H_
