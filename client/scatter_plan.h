// ScatterPlan: how the CUDA backend issues a batch of scattered host->device copies.
//
// One DMA descriptor per small block runs far below the link (64 KiB blocks: 0.3-0.6 of a bulk
// copy). So small blocks whose sources are contiguous in pinned staging travel as one bulk copy
// into a device landing buffer, and one kernel then scatters each block into its slot (device to
// device, ~3 TB/s). Large runs (>= direct_min_bytes) are copied straight to their destination:
// the copy engines reach the link with them anyway.
//
// Pure planning, no CUDA: the plan is data, so it is unit-tested on the CPU. Thread-compatible.
#ifndef KVSTAR_CLIENT_SCATTER_PLAN_H_
#define KVSTAR_CLIENT_SCATTER_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "client/device_backend.h"

namespace kvstar::client_internal {

struct ScatterPlanOptions {
  // Device bytes of the landing buffer: a round never lands more than this.
  size_t landing_capacity_bytes = size_t{16} << 20;
  // Runs (coalesced segments) of at least this many bytes are copied directly.
  size_t direct_min_bytes = size_t{1} << 20;
};

// One host->device copy into the landing buffer: landing[landing_offset, +bytes) = src[0, bytes).
struct LandingCopy {
  size_t landing_offset = 0;
  const void* src = nullptr;
  size_t bytes = 0;
};

// One device->device piece the scatter kernel moves: dst[0, bytes) = landing[landing_offset,
// +bytes).
struct ScatterPiece {
  void* dst = nullptr;
  size_t landing_offset = 0;
  size_t bytes = 0;
};

// What fits the landing buffer at once: its copies, then one scatter (in stream order).
struct ScatterRound {
  std::vector<LandingCopy> copies;
  std::vector<ScatterPiece> pieces;
  size_t landing_bytes = 0;  // end of the last byte landed in this round
};

struct ScatterPlan {
  std::vector<CopySegment> direct;  // straight host->device copies (coalesced runs)
  std::vector<ScatterRound> rounds;
  size_t landing_bytes = 0;  // the largest round's landing_bytes: the landing buffer needed

  size_t scattered_bytes() const;
  size_t direct_bytes() const;
};

// Plans `segments` (in order; later segments never overlap earlier destinations). Segments whose
// source and destination both continue the previous one are joined first. Zero-byte segments are
// dropped. Within a round, each landing copy starts at a landing offset congruent to its source
// modulo 16, so 16-byte aligned sources land 16-byte aligned.
// REQUIRES: options.landing_capacity_bytes >= 64.
ScatterPlan PlanScatteredCopy(absl::Span<const CopySegment> segments,
                              const ScatterPlanOptions& options);

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_SCATTER_PLAN_H_
