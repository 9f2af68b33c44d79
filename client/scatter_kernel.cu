// The scatter kernel (see scatter_kernel.h). Grid: x = CTAs per piece (grid-stride within the
// piece), y = piece. 16-byte loads and stores when both ends are 16-byte aligned, four in flight
// per thread; a byte loop for the tail and for misaligned pieces.
#include <cstdint>

#include "client/scatter_kernel.h"

namespace kvstar::client_internal {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr uint32_t kBytesPerCta = kThreads * kUnroll * 16;  // one unrolled pass of a CTA
constexpr uint32_t kMaxCtasPerPiece = 32;

__global__ void __launch_bounds__(kThreads)
    ScatterKernel(const __grid_constant__ ScatterKernelArgs args) {
  const ScatterKernelPiece& piece = args.pieces[blockIdx.y];
  const char* src = args.landing + piece.landing_offset;
  char* dst = static_cast<char*>(piece.dst);
  const uint64_t bytes = piece.bytes;
  const uint64_t thread = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const uint64_t threads = uint64_t{gridDim.x} * blockDim.x;
  uint64_t body = 0;
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
    const uint64_t vectors = bytes / 16;
    const int4* from = reinterpret_cast<const int4*>(src);
    int4* to = reinterpret_cast<int4*>(dst);
    uint64_t i = thread;
    for (; i + (kUnroll - 1) * threads < vectors; i += kUnroll * threads) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = from[i + u * threads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) to[i + u * threads] = v[u];
    }
    for (; i < vectors; i += threads) to[i] = from[i];
    body = vectors * 16;
  }
  for (uint64_t b = body + thread; b < bytes; b += threads) dst[b] = src[b];
}

}  // namespace

cudaError_t LaunchScatterKernel(const ScatterKernelArgs& args, cudaStream_t stream) {
  if (args.count == 0) return cudaSuccess;
  if (args.count > kMaxScatterPiecesPerLaunch) return cudaErrorInvalidValue;
  uint32_t ctas = (args.max_bytes + kBytesPerCta - 1) / kBytesPerCta;
  ctas = ctas < 1 ? 1 : (ctas > kMaxCtasPerPiece ? kMaxCtasPerPiece : ctas);
  ScatterKernel<<<dim3(ctas, args.count), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvstar::client_internal
