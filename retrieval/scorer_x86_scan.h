// Internal to the scorer's x86 kernels (scorer_x86.cc, scorer_amx.cc): the AVX-512 chunk scan
// that every one of them shares (online softmax per query row, the exp2 pass, block sums,
// prefetching), parameterised by a kernel that computes a tile's dot products. Include only where
// KVSTAR_HAVE_X86_KERNELS (scorer_kernels.h) is 1. Not part of the public API.
#ifndef KVSTAR_RETRIEVAL_SCORER_X86_SCAN_H_
#define KVSTAR_RETRIEVAL_SCORER_X86_SCAN_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "retrieval/scorer_kernels.h"

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the merge source of unmasked
// operations and then warn that it may be uninitialized (Highway silences the same).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define KVSTAR_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx512vnni")))
#define KVSTAR_AVX512_INLINE inline __attribute__((always_inline)) KVSTAR_AVX512
// The register tiles' loops must unroll fully, or the accumulators live on the stack.
#define KVSTAR_UNROLL _Pragma("GCC unroll 16")

namespace kvstar::retrieval::internal::x86 {

inline constexpr size_t kLanes = SequenceIndex::kBlocksPerGroup;  // 16 fp32 lanes: one group
inline constexpr size_t kMaxVectors = 4;
inline constexpr size_t kPrefetchTiles = 2;

// The gathered queries are a float buffer; their bit-pattern words are read through memcpy.
inline int32_t Bits(const float* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 2^x for the x86 kernels: a minimax degree-3 polynomial of f = x - floor(x) (by vreduceps), times
// 2^floor(x) (by vscalefps, which also returns 0 far below; denormals flushed by the caller). One
// FMA fewer than the Highway kernel's degree 4 (the exp2 pass is most of a tile-product kernel's
// vector work). Its relative error (7.49e-5 measured over [-126, 20]) is at most
// kFastExp2RelativeError (scorer_kernels.h), which ScoreRelativeTolerance allows for.
KVSTAR_AVX512_INLINE __m512 Exp2(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(7.802421599626541e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.2606690227985382e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.958340406417847e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999251365661621e-1f));
  return _mm512_scalef_ps(p, x);
}

// Horizontal max and sum through memory: rare (a reference move, a chunk's end), and GCC 12's
// _mm512_reduce_* warn of an uninitialized temporary.
KVSTAR_AVX512_INLINE float MaxOfLanes(__m512 v) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, v);
  float max = lanes[0];
  for (size_t i = 1; i < kLanes; ++i) max = std::max(max, lanes[i]);
  return max;
}

KVSTAR_AVX512_INLINE float SumOfLanes(__m512 v) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, v);
  float sum = 0.0f;
  for (size_t i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
}

// Per-row online-softmax state of one chunk, as in the Highway kernel (scorer.cc).
struct RowState {
  float* reference;    // [rows] log2 units
  float* threshold;    // [rows] -inf until the row saw a score, then kHeadroom
  float* chunk_sum;    // [rows][16] this group's sums of exp2(score - reference)
  float* denominator;  // [rows][16] the chunk's sums so far
};

struct Tile {
  size_t group;
  size_t first_vector;  // M index of the tile's first vector
  bool bounded;         // every row's scores stay within kHeadroom of its reference
  bool ragged;          // lanes past num_blocks (left out of the max)
  __mmask16 valid;
};

// Moves row `row`'s reference when a score in accumulator column r exceeds it by kHeadroom.
template <size_t kVectors, size_t kRows>
KVSTAR_AVX512_INLINE void CheckReference(__m512 (&acc)[kVectors][kRows], size_t r, size_t row,
                                         const RowState& state, const Tile& tile) {
  __m512 max = acc[0][r];
  KVSTAR_UNROLL
  for (size_t v = 1; v < kVectors; ++v) max = _mm512_max_ps(max, acc[v][r]);
  if (tile.ragged) max = _mm512_mask_mov_ps(_mm512_set1_ps(-HUGE_VALF), tile.valid, max);
  if (HWY_LIKELY(_mm512_cmp_ps_mask(max, _mm512_set1_ps(state.threshold[row]), _CMP_GT_OQ) == 0)) {
    return;
  }
  const float shift = MaxOfLanes(max);
  if (state.threshold[row] == kHeadroom) {
    const __m512 rescale = _mm512_set1_ps(std::exp2(-shift));
    float* sum = state.chunk_sum + row * kLanes;
    float* denominator = state.denominator + row * kLanes;
    _mm512_store_ps(sum, _mm512_mul_ps(_mm512_load_ps(sum), rescale));
    _mm512_store_ps(denominator, _mm512_mul_ps(_mm512_load_ps(denominator), rescale));
  }
  KVSTAR_UNROLL
  for (size_t v = 0; v < kVectors; ++v) acc[v][r] = _mm512_sub_ps(acc[v][r], _mm512_set1_ps(shift));
  state.reference[row] += shift;
  state.threshold[row] = kHeadroom;
}

// Scores relative to the references are in acc: the rare reference move, exp2, block sums.
template <size_t kVectors, size_t kRows>
KVSTAR_AVX512_INLINE void Accumulate(__m512 (&acc)[kVectors][kRows], size_t row0,
                                     const RowState& state, const Tile& tile) {
  KVSTAR_UNROLL
  for (size_t r = 0; r < kRows; ++r) {
    const size_t row = row0 + r;
    if (!tile.bounded) CheckReference<kVectors, kRows>(acc, r, row, state, tile);
    __m512 sum = Exp2(acc[0][r]);
    KVSTAR_UNROLL
    for (size_t v = 1; v < kVectors; ++v) sum = _mm512_add_ps(sum, Exp2(acc[v][r]));
    float* chunk_sum = state.chunk_sum + row * kLanes;
    _mm512_store_ps(chunk_sum, _mm512_add_ps(_mm512_load_ps(chunk_sum), sum));
  }
}

// ScoreTile of the register-tile kernels (Kernel::kMaxRows, Kernel::Run<kVectors, kRows>): all
// rows against one tile of kVectors vectors, in balanced row groups of at most kMaxRows; the tile
// kPrefetchTiles ahead is prefetched a share per row group.
template <size_t kVectors, class Kernel>
KVSTAR_AVX512_INLINE void ScoreRows(const Kernel& kernel, size_t num_rows, const RowState& state,
                                    const Tile& tile, const char* next, size_t next_bytes) {
  constexpr size_t kMaxRows = Kernel::kMaxRows;
  const size_t groups = (num_rows + kMaxRows - 1) / kMaxRows;
  const size_t base = num_rows / groups, extra = num_rows % groups;
  const size_t share = (next_bytes / groups + 63) / 64 * 64 + 64;
  size_t row = 0;
  for (size_t g = 0; g < groups; ++g) {
    for (size_t offset = g * share; offset < std::min(next_bytes, (g + 1) * share); offset += 64) {
      _mm_prefetch(next + offset, _MM_HINT_T0);
    }
    const size_t rows = base + (g < extra ? 1 : 0);
    switch (rows) {
      case 1:
        kernel.template Run<kVectors, 1>(row, state, tile);
        break;
      case 2:
        kernel.template Run<kVectors, 2>(row, state, tile);
        break;
      case 3:
        kernel.template Run<kVectors, 3>(row, state, tile);
        break;
      case 4:
        if constexpr (kMaxRows >= 4) kernel.template Run<kVectors, 4>(row, state, tile);
        break;
      case 5:
        if constexpr (kMaxRows >= 5) kernel.template Run<kVectors, 5>(row, state, tile);
        break;
      case 6:
        if constexpr (kMaxRows >= 6) kernel.template Run<kVectors, 6>(row, state, tile);
        break;
      default:
        break;
    }
    row += rows;
  }
}

// One chunk's pass with an online softmax per row, as ScoreChunkImpl in scorer.cc does it, with
// the group (16 blocks) as the lane chunk. The kernel scores one tile (kVectors representation
// vectors of one group, all rows) at a time: Words(group, vector) and VectorBytes() locate the
// representation; ScratchFloats() floats of the chunk's scratch, 64-byte aligned, are its own
// (handed over by UseScratch before the first tile); ScoreTile<kVectors>(num_rows, state, tile,
// next, next_bytes) computes the tile's scores relative to each row's reference, hands them to
// Accumulate and prefetches the next_bytes at `next`.
template <class Kernel>
KVSTAR_AVX512_INLINE void ScanChunk(const ChunkArgs& args, Kernel& kernel) {
  const size_t num_rows = args.num_rows;
  const PartialsLayout layout(args.num_blocks, num_rows, args.num_chunks);
  const size_t first_group = layout.FirstGroup(args.chunk);
  const size_t end_group = layout.FirstGroup(args.chunk + 1);
  const GatheredLayout gathered(num_rows, args.kept);
  const float* query_norm = args.gathered + gathered.norms;
  const size_t rows16 = (num_rows + 15) / 16 * 16;
  const size_t state_floats =
      (2 * num_rows * kLanes + 2 * rows16 + (end_group - first_group) * num_rows + 15) / 16 * 16;
  float* memory = args.scratch->Get(state_floats + kernel.ScratchFloats());
  kernel.UseScratch(memory + state_floats);
  RowState state;
  state.chunk_sum = memory;
  state.denominator = state.chunk_sum + num_rows * kLanes;
  state.reference = state.denominator + num_rows * kLanes;
  state.threshold = state.reference + rows16;
  float* group_reference = state.threshold + rows16;  // [groups of the chunk][rows]
  for (size_t row = 0; row < num_rows; ++row) {
    state.reference[row] = 0.0f;
    state.threshold[row] = -HUGE_VALF;
    _mm512_store_ps(state.denominator + row * kLanes, _mm512_setzero_ps());
  }
  auto rows_bounded = [&](size_t group) {
    for (size_t row = 0; row < num_rows; ++row) {
      if (state.threshold[row] != kHeadroom ||
          query_norm[row] * args.group_norms[group] > state.reference[row] + kHeadroom) {
        return false;
      }
    }
    return true;
  };
  const size_t vector_bytes = kernel.VectorBytes();
  for (size_t group = first_group; group < end_group; ++group) {
    const size_t first_block = group * kLanes;
    const size_t valid_lanes = std::min(kLanes, args.num_blocks - first_block);
    Tile tile;
    tile.group = group;
    tile.ragged = valid_lanes < kLanes;
    tile.valid = static_cast<__mmask16>((1u << valid_lanes) - 1);
    for (size_t row = 0; row < num_rows; ++row) {
      _mm512_store_ps(state.chunk_sum + row * kLanes, _mm512_setzero_ps());
    }
    tile.bounded = rows_bounded(group);
    for (size_t m = 0; m < args.vectors; m += kMaxVectors) {
      tile.first_vector = m;
      const size_t vectors = std::min(kMaxVectors, args.vectors - m);
      const char* next = reinterpret_cast<const char*>(kernel.Words(group, m)) +
                         kPrefetchTiles * kMaxVectors * vector_bytes;
      const size_t next_bytes = vectors * vector_bytes;
      switch (vectors) {
        case 1:
          kernel.template ScoreTile<1>(num_rows, state, tile, next, next_bytes);
          break;
        case 2:
          kernel.template ScoreTile<2>(num_rows, state, tile, next, next_bytes);
          break;
        case 3:
          kernel.template ScoreTile<3>(num_rows, state, tile, next, next_bytes);
          break;
        default:
          kernel.template ScoreTile<4>(num_rows, state, tile, next, next_bytes);
          break;
      }
      if (!tile.bounded) tile.bounded = rows_bounded(group);
    }
    for (size_t row = 0; row < num_rows; ++row) {
      const __m512 sum =
          _mm512_maskz_mov_ps(tile.valid, _mm512_load_ps(state.chunk_sum + row * kLanes));
      _mm512_store_ps(args.partials + layout.Sums(group, row, 0), sum);
      group_reference[(group - first_group) * num_rows + row] = state.reference[row];
      float* denominator = state.denominator + row * kLanes;
      _mm512_store_ps(denominator, _mm512_add_ps(_mm512_load_ps(denominator), sum));
    }
  }
  // Everything relative to the chunk's final reference.
  for (size_t group = first_group; group < end_group; ++group) {
    for (size_t row = 0; row < num_rows; ++row) {
      const float moved =
          group_reference[(group - first_group) * num_rows + row] - state.reference[row];
      if (moved == 0.0f) continue;
      float* sum = args.partials + layout.Sums(group, row, 0);
      _mm512_store_ps(sum, _mm512_mul_ps(_mm512_load_ps(sum), _mm512_set1_ps(std::exp2(moved))));
    }
  }
  for (size_t row = 0; row < num_rows; ++row) {
    args.partials[layout.reference + args.chunk * num_rows + row] = state.reference[row];
    args.partials[layout.denominator + args.chunk * num_rows + row] =
        SumOfLanes(_mm512_load_ps(state.denominator + row * kLanes));
  }
}

}  // namespace kvstar::retrieval::internal::x86

#endif  // KVSTAR_RETRIEVAL_SCORER_X86_SCAN_H_
