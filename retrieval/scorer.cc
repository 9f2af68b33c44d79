#include "retrieval/scorer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // MXCSR: flush denormals in the kernel
#endif

#include "absl/strings/str_cat.h"
#include "hwy/base.h"
#include "hwy/cache_control.h"
#include "retrieval/convert.h"
#include "retrieval/quantize.h"
#include "retrieval/scorer_kernels.h"

#ifndef KVSTAR_RETRIEVAL_SCORER_CC_ONCE_
#define KVSTAR_RETRIEVAL_SCORER_CC_ONCE_
namespace kvstar::retrieval {
using internal::ChunkArgs;
using internal::GatheredLayout;
using internal::kHeadroom;
using internal::PartialsLayout;
}  // namespace kvstar::retrieval
#endif  // KVSTAR_RETRIEVAL_SCORER_CC_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "retrieval/scorer.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace kvstar::retrieval {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Lanes are blocks of one representation group (at most kBlocksPerGroup of them).
using DF = hn::CappedTag<float, SequenceIndex::kBlocksPerGroup>;
using VF = hn::Vec<DF>;
using DU = hn::RebindToUnsigned<DF>;
using DI = hn::RebindToSigned<DF>;

// Accumulator budget of the micro-kernel: 24 of 32 vector registers where there are 32
// (AVX-512, NEON, SVE), 8 of 16 on AVX2/SSE and the emulated targets.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr size_t kMaxRows = 2;
#else
constexpr size_t kMaxRows = 6;
#endif
constexpr size_t kMaxVectors = 4;  // representation vectors (M index) per micro-kernel tile
// How many tiles ahead the representation is prefetched.
constexpr size_t kPrefetchTiles = 2;

// 2^x for x <= kHeadroom, relative error 2.6e-6 (ranking needs ~1e-4): minimax degree-4
// polynomial of 2^f times 2^n.
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
// f = x - floor(x) in one vreduceps, 2^floor(x) applied by vscalefps, which also returns 0 (or a
// denormal, flushed by the caller's FTZ) far below: 6 instructions instead of 10.
HWY_INLINE VF Exp2(DF df, VF x) {
  const VF f{_mm512_reduce_ps(x.raw, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)};
  VF p = hn::Set(df, 1.3534167911694569e-2f);
  p = hn::MulAdd(p, f, hn::Set(df, 5.20114606190554e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.414427568861899e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.93003834471064e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0000025933706653f));
  return VF{_mm512_scalef_ps(p.raw, x.raw)};
}
#else
// f in [-0.5, 0.5]; n = round(x) is taken from the low mantissa bits of x + 1.5 * 2^23 (which also
// carry the exponent bias). Returns 0 below 2^-126.5.
HWY_INLINE VF Exp2(DF df, VF x) {
  const DU du;
  const VF shifter = hn::Set(df, 12583039.0f);  // 1.5 * 2^23 + 127
  x = hn::Max(x, hn::Set(df, -127.0f));
  const VF t = hn::Add(x, shifter);
  const VF f = hn::Sub(x, hn::Sub(t, shifter));
  VF p = hn::Set(df, 9.570101908081146e-3f);
  p = hn::MulAdd(p, f, hn::Set(df, 5.5917860319303916e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4024744827944053e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.931218147367708e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.999992614457144e-1f));
  return hn::Mul(p, hn::BitCast(df, hn::ShiftLeft<23>(hn::BitCast(du, t))));
}
#endif

// Per-row softmax state while scanning one chunk. Scores are kept relative to `reference`, an
// actual score of the row no lower than its running max minus kHeadroom; sums are relative to it.
struct RowState {
  float* reference;    // [rows] reference max, log2 units
  float* threshold;    // [rows] -inf until the row saw a score, then kHeadroom
  float* chunk_sum;    // [rows][lanes] this lane chunk's sum of exp2(score - reference) per block
  float* denominator;  // [rows][lanes] the chunk's lane chunks' sums so far, per lane
};

// Moves row `row`'s reference when a score in accumulator column r exceeds it by kHeadroom (or
// the row has none yet), rescaling what was summed against the old one. Rare after the first
// tile of a row.
template <size_t kVectors, size_t kRows>
HWY_INLINE void CheckReference(DF df, VF (&acc)[kVectors][kRows], size_t r, size_t row,
                               const RowState& state, bool ragged, const VF valid) {
  const size_t lanes = hn::Lanes(df);
  VF max = acc[0][r];
  HWY_UNROLL(4)
  for (size_t v = 1; v < kVectors; ++v) max = hn::Max(max, acc[v][r]);
  if (ragged) max = hn::IfThenElse(hn::MaskFromVec(valid), max, hn::Set(df, -HUGE_VALF));
  if (HWY_LIKELY(hn::AllFalse(df, hn::Gt(max, hn::Set(df, state.threshold[row]))))) return;
  const float shift = hn::GetLane(hn::MaxOfLanes(df, max));
  if (state.threshold[row] == kHeadroom) {
    const VF rescale = hn::Set(df, std::exp2(-shift));
    float* sum = state.chunk_sum + row * lanes;
    float* denominator = state.denominator + row * lanes;
    hn::Store(hn::Mul(hn::Load(df, sum), rescale), df, sum);
    hn::Store(hn::Mul(hn::Load(df, denominator), rescale), df, denominator);
  }
  HWY_UNROLL(4)
  for (size_t v = 0; v < kVectors; ++v) acc[v][r] = hn::Sub(acc[v][r], hn::Set(df, shift));
  state.reference[row] += shift;
  state.threshold[row] = kHeadroom;
}

// Micro-kernel: kVectors representation vectors (each `lanes` blocks) x kRows query rows.
// For every kept channel, kVectors loads of the widened representation and kRows broadcasts of
// query values feed kVectors * kRows FMAs; accumulators start at -reference, so the exp pass
// reads them directly. Then per row: the rare move of the reference, exp2, and the block sums.
// `bounded`: every row's scores are known to stay within kHeadroom of its reference (see
// ScoreHeadImpl), so the per-row max is skipped. Padding lanes (`ragged`, beyond num_blocks)
// are left out of the max and masked out of the sums by the caller.
template <size_t kVectors, size_t kRows>
HWY_INLINE void ScoreTile(DF df, const float* HWY_RESTRICT widened, size_t kept,
                          const float* HWY_RESTRICT queries, size_t row0, const RowState& state,
                          bool bounded, bool ragged, const VF valid) {
  const size_t lanes = hn::Lanes(df);
  VF acc[kVectors][kRows];
  {
    VF w[kVectors];
    HWY_UNROLL(4)
    for (size_t v = 0; v < kVectors; ++v) w[v] = hn::Load(df, widened + v * kept * lanes);
    HWY_UNROLL(8)
    for (size_t r = 0; r < kRows; ++r) {
      const VF q = hn::Set(df, queries[(row0 + r) * kept]);
      const VF start = hn::Set(df, -state.reference[row0 + r]);
      HWY_UNROLL(4)
      for (size_t v = 0; v < kVectors; ++v) acc[v][r] = hn::MulAdd(w[v], q, start);
    }
  }
  for (size_t c = 1; c < kept; ++c) {
    VF w[kVectors];
    HWY_UNROLL(4)
    for (size_t v = 0; v < kVectors; ++v) w[v] = hn::Load(df, widened + (v * kept + c) * lanes);
    HWY_UNROLL(8)
    for (size_t r = 0; r < kRows; ++r) {
      const VF q = hn::Set(df, queries[(row0 + r) * kept + c]);
      HWY_UNROLL(4)
      for (size_t v = 0; v < kVectors; ++v) acc[v][r] = hn::MulAdd(w[v], q, acc[v][r]);
    }
  }
  HWY_UNROLL(8)
  for (size_t r = 0; r < kRows; ++r) {
    const size_t row = row0 + r;
    if (!bounded) CheckReference<kVectors, kRows>(df, acc, r, row, state, ragged, valid);
    VF sum = Exp2(df, acc[0][r]);
    HWY_UNROLL(4)
    for (size_t v = 1; v < kVectors; ++v) sum = hn::Add(sum, Exp2(df, acc[v][r]));
    float* chunk_sum = state.chunk_sum + row * lanes;
    hn::Store(hn::Add(hn::Load(df, chunk_sum), sum), df, chunk_sum);
  }
}

// All query rows against kVectors widened representation vectors, in row groups of at most
// kMaxRows (balanced, so 40 rows run as 6,6,6,6,6,5,5 rather than 6 x 6 + 4).
// `next`, `next_bytes`: the representation of the next tile, prefetched a share per row group so
// that it streams in while this tile is scored without a burst that fills the line buffers.
template <size_t kVectors>
HWY_INLINE void ScoreVectors(DF df, const float* widened, size_t kept, const float* queries,
                             size_t num_rows, const RowState& state, bool bounded, bool ragged,
                             VF valid, const char* next, size_t next_bytes) {
  const size_t groups = (num_rows + kMaxRows - 1) / kMaxRows;
  const size_t base = num_rows / groups, extra = num_rows % groups;
  const size_t prefetch_share = hwy::RoundUpTo(hwy::DivCeil(next_bytes, groups), 64);
  size_t row = 0;
  for (size_t g = 0; g < groups; ++g) {
    for (size_t offset = g * prefetch_share;
         offset < std::min(next_bytes, (g + 1) * prefetch_share); offset += 64) {
      hwy::Prefetch(next + offset);
    }
    const size_t rows = base + (g < extra ? 1 : 0);
    switch (rows) {
#define KVSTAR_SCORE_ROWS(N)                                                                  \
  case N:                                                                                     \
    if constexpr (N <= kMaxRows) {                                                            \
      ScoreTile<kVectors, N>(df, widened, kept, queries, row, state, bounded, ragged, valid); \
    }                                                                                         \
    break;
      KVSTAR_SCORE_ROWS(1)
      KVSTAR_SCORE_ROWS(2)
      KVSTAR_SCORE_ROWS(3)
      KVSTAR_SCORE_ROWS(4)
      KVSTAR_SCORE_ROWS(5)
      KVSTAR_SCORE_ROWS(6)
#undef KVSTAR_SCORE_ROWS
      default:
        break;
    }
    row += rows;
  }
}

// `queries`: [num_rows][kept] fp32, already scaled by log2(e) / sqrt(head_dim) so that the
// softmax is computed with exp2; `query_norm`: their L2 norms. `rep`: bf16 in SequenceIndex's
// stored order.
//
// One pass over the chunk's groups with an online softmax per query row. Blocks are in lanes, so
// every exp and FMA lane does useful work and a block's sum over its M vectors is a vertical add.
// Per lane chunk (`lanes` blocks) and per row, the sum of exp2(score - reference) is stored in
// the partials; the reference only moves when a score exceeds it by kHeadroom, so the hot loop
// has no per-block max and no rescaling. At the end the lane chunks summed against an older
// reference are rescaled to the chunk's final one (rare), and the chunk's reference and
// denominator are stored for MergeChunksImpl.
//
// A group skips the per-row max entirely when |q_row| * (its largest vector norm), a bound on
// every score by Cauchy-Schwarz, is within kHeadroom of every row's reference; the check is
// repeated after each tile until it holds, so a chunk's first group pays only for its first tile.
void ScoreChunkImpl(const ChunkArgs* args) {
  const uint16_t* HWY_RESTRICT rep = args->rep;
  const uint8_t* HWY_RESTRICT codes = args->codes;
  const float* HWY_RESTRICT code_scales = args->code_scales;
  const float* HWY_RESTRICT group_norms = args->group_norms;
  const size_t num_blocks = args->num_blocks, vectors = args->vectors, kept = args->kept;
  const size_t num_rows = args->num_rows, chunk = args->chunk, num_chunks = args->num_chunks;
  const float* HWY_RESTRICT queries = args->gathered;
  const float* HWY_RESTRICT query_norm = args->gathered + GatheredLayout(num_rows, kept).norms;
  float* HWY_RESTRICT partials = args->partials;
  ScoreScratch* scratch = args->scratch;
  const DF df;
  const DU du;
  const size_t lanes = hn::Lanes(df);
  const size_t group_blocks = SequenceIndex::kBlocksPerGroup;
  const size_t chunks_per_group = group_blocks / lanes;
  const PartialsLayout layout(num_blocks, num_rows, num_chunks);
  const size_t first_group = layout.FirstGroup(chunk);
  const size_t end_group = layout.FirstGroup(chunk + 1);
  const size_t first_lane_chunk = first_group * chunks_per_group;
  const size_t num_lane_chunks = (end_group - first_group) * chunks_per_group;
  const size_t kept_pairs = (kept + 1) / 2;
  const size_t align = 64 / sizeof(float);
  const size_t widened_size = hwy::RoundUpTo(kMaxVectors * 2 * kept_pairs * lanes, align);
  const size_t row_vectors_size = hwy::RoundUpTo(num_rows * lanes, align);
  const size_t row_scalars_size = hwy::RoundUpTo(num_rows, align);
  float* widened = scratch->Get(widened_size + 2 * row_vectors_size + 2 * row_scalars_size +
                                num_lane_chunks * num_rows);
  RowState state;
  state.chunk_sum = widened + widened_size;
  state.denominator = state.chunk_sum + row_vectors_size;
  state.reference = state.denominator + row_vectors_size;
  state.threshold = state.reference + row_scalars_size;
  float* lane_chunk_reference = state.threshold + row_scalars_size;  // [lane chunks][rows]

  for (size_t row = 0; row < num_rows; ++row) {
    state.reference[row] = 0.0f;
    state.threshold[row] = -HUGE_VALF;
    hn::Store(hn::Zero(df), df, state.denominator + row * lanes);
  }
  const size_t group_values = vectors * kept_pairs * group_blocks * 2;
  const size_t vector_values = kept_pairs * group_blocks * 2;
  const size_t kept_quads = (kept + 3) / 4;
  const size_t vector_codes = kept_quads * group_blocks * 4;
  const size_t group_codes = vectors * vector_codes;
  const auto high_half = hn::Set(du, 0xFFFF0000u);
  // Rounding may let a score pass the bound by ulps; exp2 just above kHeadroom is harmless.
  auto rows_bounded = [&](size_t group) {
    for (size_t row = 0; row < num_rows; ++row) {
      if (state.threshold[row] != kHeadroom ||
          query_norm[row] * group_norms[group] > state.reference[row] + kHeadroom) {
        return false;
      }
    }
    return true;
  };

  for (size_t local = 0; local < num_lane_chunks; ++local) {
    const size_t lane_chunk = first_lane_chunk + local;
    const size_t group = lane_chunk / chunks_per_group;
    const size_t first_lane = (lane_chunk % chunks_per_group) * lanes;
    const size_t first_block = group * group_blocks + first_lane;
    if (first_block >= num_blocks) continue;
    const size_t valid_lanes = std::min(lanes, num_blocks - first_block);
    const bool ragged = valid_lanes < lanes;
    const VF valid = hn::VecFromMask(df, hn::FirstN(df, valid_lanes));
    for (size_t row = 0; row < num_rows; ++row) {
      hn::Store(hn::Zero(df), df, state.chunk_sum + row * lanes);
    }
    bool bounded = rows_bounded(group);
    // Read as 32-bit words (channel pairs, or int8 quads); Highway loads do not assume the
    // pointee type.
    const uint32_t* group_rep =
        codes != nullptr
            ? reinterpret_cast<const uint32_t*>(codes + group * group_codes) + first_lane
            : reinterpret_cast<const uint32_t*>(rep + group * group_values) + first_lane;
    for (size_t m = 0; m < vectors; m += kMaxVectors) {
      const size_t tile = std::min(kMaxVectors, vectors - m);
      // Widen this tile's bf16 pairs to fp32 [tile][kept][lanes]: the low half of each 32-bit
      // word is the even channel, the high half the odd one.
      for (size_t v = 0; v < tile && codes != nullptr; ++v) {
        // int8: (code - offset) * the vector's scale, 4 channels per word, low byte first.
        const uint32_t* src = group_rep + (m + v) * vector_codes / 4;
        float* dst = widened + v * kept * lanes;
        const VF scale =
            hn::LoadU(df, code_scales + (group * vectors + m + v) * group_blocks + first_lane);
        const DI di;
        const auto byte_mask = hn::Set(du, 0xFFu);
        const VF code_offset = hn::Set(df, static_cast<float>(kInt8CodeOffset));
        auto widen = [&](auto bytes) {
          return hn::Mul(
              hn::Sub(hn::ConvertTo(df, hn::BitCast(di, hn::And(bytes, byte_mask))), code_offset),
              scale);
        };
        for (size_t quad = 0; quad < kept_quads; ++quad) {
          const auto words = hn::LoadU(du, src + quad * group_blocks);
          const size_t c = 4 * quad;
          hn::Store(widen(words), df, dst + c * lanes);
          if (c + 1 < kept) hn::Store(widen(hn::ShiftRight<8>(words)), df, dst + (c + 1) * lanes);
          if (c + 2 < kept) hn::Store(widen(hn::ShiftRight<16>(words)), df, dst + (c + 2) * lanes);
          if (c + 3 < kept) hn::Store(widen(hn::ShiftRight<24>(words)), df, dst + (c + 3) * lanes);
        }
      }
      for (size_t v = 0; v < tile && codes == nullptr; ++v) {
        const uint32_t* src = group_rep + (m + v) * vector_values / 2;
        float* dst = widened + v * kept * lanes;
        for (size_t pair = 0; pair < kept_pairs; ++pair) {
          const auto words = hn::LoadU(du, src + pair * group_blocks);
          hn::Store(hn::BitCast(df, hn::ShiftLeft<16>(words)), df, dst + 2 * pair * lanes);
          if (2 * pair + 1 < kept) {
            hn::Store(hn::BitCast(df, hn::And(words, high_half)), df, dst + (2 * pair + 1) * lanes);
          }
        }
      }
      // The next tile (the next group's first, at the end) streams in while this one is scored.
      const size_t vector_bytes =
          codes != nullptr ? vector_codes : vector_values * sizeof(uint16_t);
      const char* next = reinterpret_cast<const char*>(group_rep) +
                         (m + kPrefetchTiles * kMaxVectors) * vector_bytes;
      const size_t next_bytes = tile * vector_bytes;
      switch (tile) {
        case 1:
          ScoreVectors<1>(df, widened, kept, queries, num_rows, state, bounded, ragged, valid, next,
                          next_bytes);
          break;
        case 2:
          ScoreVectors<2>(df, widened, kept, queries, num_rows, state, bounded, ragged, valid, next,
                          next_bytes);
          break;
        case 3:
          ScoreVectors<3>(df, widened, kept, queries, num_rows, state, bounded, ragged, valid, next,
                          next_bytes);
          break;
        default:
          ScoreVectors<4>(df, widened, kept, queries, num_rows, state, bounded, ragged, valid, next,
                          next_bytes);
          break;
      }
      if (!bounded) bounded = rows_bounded(group);
    }
    for (size_t row = 0; row < num_rows; ++row) {
      VF sum = hn::Load(df, state.chunk_sum + row * lanes);
      if (ragged) sum = hn::And(sum, valid);
      hn::Store(sum, df, partials + layout.Sums(group, row, first_lane));
      lane_chunk_reference[local * num_rows + row] = state.reference[row];
      float* denominator = state.denominator + row * lanes;
      hn::Store(hn::Add(hn::Load(df, denominator), sum), df, denominator);
    }
  }

  // Everything relative to the chunk's final reference.
  for (size_t local = 0; local < num_lane_chunks; ++local) {
    const size_t lane_chunk = first_lane_chunk + local;
    const size_t group = lane_chunk / chunks_per_group;
    const size_t first_lane = (lane_chunk % chunks_per_group) * lanes;
    if (group * group_blocks + first_lane >= num_blocks) continue;
    for (size_t row = 0; row < num_rows; ++row) {
      const float moved = lane_chunk_reference[local * num_rows + row] - state.reference[row];
      if (moved == 0.0f) continue;
      float* sum = partials + layout.Sums(group, row, first_lane);
      hn::Store(hn::Mul(hn::Load(df, sum), hn::Set(df, std::exp2(moved))), df, sum);
    }
  }
  for (size_t row = 0; row < num_rows; ++row) {
    partials[layout.reference + chunk * num_rows + row] = state.reference[row];
    partials[layout.denominator + chunk * num_rows + row] =
        hn::GetLane(hn::SumOfLanes(df, hn::Load(df, state.denominator + row * lanes)));
  }
}

// head_scores[b] = sum over rows of partial * 2^(chunk reference - common reference) /
// denominator, where the common reference is the rows' max over chunks and the denominator the
// chunks' denominators rescaled to it, summed in chunk order.
void MergeChunksImpl(size_t num_blocks, size_t num_rows, size_t num_chunks,
                     const float* HWY_RESTRICT partials, float* HWY_RESTRICT head_scores,
                     ScoreScratch* scratch, bool max_vote) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const size_t group_blocks = SequenceIndex::kBlocksPerGroup;
  const size_t chunks_per_group = group_blocks / lanes;
  const PartialsLayout layout(num_blocks, num_rows, num_chunks);
  float* weight = scratch->Get(num_chunks * num_rows + lanes);  // [chunks][rows]
  float* ragged_scores = weight + num_chunks * num_rows;        // [lanes]
  const float* reference = partials + layout.reference;
  const float* denominator = partials + layout.denominator;
  for (size_t row = 0; row < num_rows; ++row) {
    float common = reference[row];
    for (size_t c = 1; c < num_chunks; ++c)
      common = std::max(common, reference[c * num_rows + row]);
    float total = 0.0f;
    for (size_t c = 0; c < num_chunks; ++c) {
      const float moved = reference[c * num_rows + row] - common;
      weight[c * num_rows + row] = moved == 0.0f ? 1.0f : std::exp2(moved);
      total += denominator[c * num_rows + row] * weight[c * num_rows + row];
    }
    const float inverse = 1.0f / total;
    for (size_t c = 0; c < num_chunks; ++c) weight[c * num_rows + row] *= inverse;
  }
  for (size_t chunk = 0; chunk < num_chunks; ++chunk) {
    const float* chunk_weight = weight + chunk * num_rows;
    for (size_t lane_chunk = layout.FirstGroup(chunk) * chunks_per_group;
         lane_chunk < layout.FirstGroup(chunk + 1) * chunks_per_group; ++lane_chunk) {
      const size_t group = lane_chunk / chunks_per_group;
      const size_t first_lane = (lane_chunk % chunks_per_group) * lanes;
      const size_t first_block = group * group_blocks + first_lane;
      if (first_block >= num_blocks) continue;
      const float* partial_sum = partials + layout.Sums(group, 0, first_lane);
      VF acc = hn::Zero(df);
      if (max_vote) {
        for (size_t row = 0; row < num_rows; ++row) {
          acc = hn::Max(acc, hn::Mul(hn::Load(df, partial_sum + row * group_blocks),
                                     hn::Set(df, chunk_weight[row])));
        }
      } else {
        for (size_t row = 0; row < num_rows; ++row) {
          acc = hn::MulAdd(hn::Load(df, partial_sum + row * group_blocks),
                           hn::Set(df, chunk_weight[row]), acc);
        }
      }
      const size_t valid_lanes = std::min(lanes, num_blocks - first_block);
      if (valid_lanes == lanes) {
        hn::StoreU(acc, df, head_scores + first_block);
      } else {
        hn::StoreU(acc, df, ragged_scores);
        std::copy(ragged_scores, ragged_scores + valid_lanes, head_scores + first_block);
      }
    }
  }
}

int64_t TargetImpl() { return HWY_TARGET; }

}  // namespace HWY_NAMESPACE
}  // namespace kvstar::retrieval
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvstar::retrieval {

HWY_EXPORT(ScoreChunkImpl);
HWY_EXPORT(MergeChunksImpl);
HWY_EXPORT(TargetImpl);

const char* DispatchedTargetName() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetImpl)()); }

float* ScoreScratch::Get(size_t floats) {
  if (floats > capacity_) {
    buffer_ = hwy::AllocateAligned<float>(floats);
    capacity_ = floats;
  }
  return buffer_.get();
}

absl::Status CheckScoreArgs(const SequenceIndex& index, uint32_t layer,
                            absl::Span<const uint8_t> queries, uint32_t num_queries) {
  const ModelShape& shape = index.shape();
  if (layer >= shape.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer = ", layer, ": must be below num_layers (", shape.num_layers, ")"));
  }
  const uint32_t max_queries = index.knobs().max_seal_queries();
  if (num_queries == 0 || num_queries > max_queries) {
    return absl::InvalidArgumentError(absl::StrCat("num_queries = ", num_queries,
                                                   ": must be in [1, max(retrieval_stride, ",
                                                   kMaxSealQueries, ") = ", max_queries, "]"));
  }
  if (queries.size() != shape.query_bytes(num_queries)) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries of layer ", layer, " have ", queries.size(), " bytes, expected ",
                     shape.query_bytes(num_queries), " ([", num_queries, "][", shape.num_q_heads,
                     "][", shape.head_dim, "] ", DTypeName(shape.dtype), ")"));
  }
  if (!index.sealed(layer)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " is not sealed"));
  }
  return absl::OkStatus();
}

namespace {

// Flushes denormals while alive: exp2 far below the max may produce them, and each one costs a
// microcode assist. They are below 2^-126 of the row max, so flushing does not change any score.
class FlushDenormals {
 public:
#if HWY_ARCH_X86
  FlushDenormals() : saved_csr_(_mm_getcsr()) {
    _mm_setcsr(saved_csr_ | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);
  }
  ~FlushDenormals() { _mm_setcsr(saved_csr_); }

 private:
  unsigned int saved_csr_;
#endif
};

}  // namespace

uint32_t ChunksPerHead(uint32_t num_blocks) {
  const uint32_t groups =
      (num_blocks + SequenceIndex::kBlocksPerGroup - 1) / SequenceIndex::kBlocksPerGroup;
  return std::clamp(groups / kMinGroupsPerChunk, 1u, kMaxChunksPerHead);
}

size_t NumQueryRows(const SequenceIndex& index, uint32_t num_queries) {
  return size_t{num_queries} * index.shape().group_size();
}

size_t GatheredQueryFloats(const SequenceIndex& index, uint32_t num_queries) {
  return GatheredLayout(NumQueryRows(index, num_queries), index.kept()).floats;
}

namespace {

void StoreBits(uint32_t bits, float* out) { std::memcpy(out, &bits, sizeof(bits)); }

float DotScale(const ModelShape& shape) {
  return static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(shape.head_dim)));
}

}  // namespace

void GatherHeadQueries(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                       absl::Span<const uint8_t> queries, uint32_t num_queries,
                       absl::Span<float> gathered) {
  const ModelShape& shape = index.shape();
  const uint32_t group = shape.group_size();
  const uint32_t kept = index.kept();
  const float scale = DotScale(shape);
  const bool int8 = index.format() == RepresentationFormat::kInt8;
  const GatheredLayout layout(NumQueryRows(index, num_queries), kept);
  const absl::Span<const uint32_t> channels = index.kept_channels(layer, kv_head);
  std::vector<float> values(kept);
  std::vector<int8_t> codes(layout.quads * 4, 0), low_codes(layout.quads * 4, 0);
  for (uint32_t token = 0; token < num_queries; ++token) {
    for (uint32_t g = 0; g < group; ++g) {
      const size_t q_head = size_t{kv_head} * group + g;
      const size_t base = (size_t{token} * shape.num_q_heads + q_head) * shape.head_dim;
      const size_t r = size_t{token} * group + g;
      for (uint32_t j = 0; j < kept; ++j) {
        values[j] = LoadAsF32(shape.dtype, queries.data(), base + channels[j]);
      }
      // bf16 pairs of the unscaled row and of what they miss (the bf16 dot path).
      for (uint32_t pair = 0; pair < layout.pairs; ++pair) {
        uint32_t high = 0, low = 0;
        for (uint32_t half = 0; half < 2 && 2 * pair + half < kept; ++half) {
          const float value = values[2 * pair + half];
          const uint16_t h = F32ToBf16(value);
          high |= uint32_t{h} << (16 * half);
          low |= uint32_t{F32ToBf16(value - Bf16ToF32(h))} << (16 * half);
        }
        StoreBits(high, &gathered[layout.high + r * layout.pairs + pair]);
        StoreBits(low, &gathered[layout.low + r * layout.pairs + pair]);
      }
      // int8 codes (int8 representations score the quantized row on every path).
      const float code_scale =
          QuantizeQueryInt8(values.data(), kept, codes.data(), low_codes.data());
      int32_t code_sum = 0, low_code_sum = 0;
      for (uint32_t quad = 0; quad < layout.quads; ++quad) {
        uint32_t word = 0, low_word = 0;
        for (uint32_t k = 0; k < 4; ++k) {
          word |= uint32_t{static_cast<uint8_t>(codes[4 * quad + k])} << (8 * k);
          low_word |= uint32_t{static_cast<uint8_t>(low_codes[4 * quad + k])} << (8 * k);
          code_sum += codes[4 * quad + k];
          low_code_sum += low_codes[4 * quad + k];
        }
        StoreBits(word, &gathered[layout.quad_codes + r * layout.quads + quad]);
        StoreBits(low_word, &gathered[layout.low_quad_codes + r * layout.quads + quad]);
      }
      gathered[layout.factor + r] = code_scale * scale;
      StoreBits(static_cast<uint32_t>(-int32_t{kInt8CodeOffset} * code_sum),
                &gathered[layout.offset + r]);
      StoreBits(static_cast<uint32_t>(-int32_t{kInt8CodeOffset} * low_code_sum),
                &gathered[layout.low_offset + r]);
      // fp32 rows for the Highway kernel and the bound, scaled for exp2.
      float* row = &gathered[r * kept];
      double squares = 0.0;
      for (uint32_t j = 0; j < kept; ++j) {
        row[j] = int8 ? static_cast<float>(QueryCodeValue(codes[j], low_codes[j]) *
                                           gathered[layout.factor + r])
                      : scale * values[j];
        squares += double{row[j]} * row[j];
      }
      gathered[layout.norms + r] = static_cast<float>(std::sqrt(squares));
    }
  }
}

size_t HeadPartialsFloats(uint32_t num_blocks, size_t num_rows, uint32_t num_chunks) {
  return PartialsLayout(num_blocks, num_rows, num_chunks).floats;
}

namespace {

std::atomic<ScorePath> forced_path{ScorePath::kAuto};

}  // namespace

const char* ScorePathName(ScorePath path) {
  switch (path) {
    case ScorePath::kAuto:
      return "auto";
    case ScorePath::kHighway:
      return "highway";
    case ScorePath::kBf16Dot:
      return "bf16-dot";
    case ScorePath::kInt8Vnni:
      return "int8-vnni";
    case ScorePath::kAmxBf16:
      return "amx-bf16";
    case ScorePath::kAmxInt8:
      return "amx-int8";
  }
  return "unknown";
}

bool ScorePathSupported(ScorePath path, RepresentationFormat format) {
  switch (path) {
    case ScorePath::kAuto:
    case ScorePath::kHighway:
      return true;
    case ScorePath::kBf16Dot:
      return format == RepresentationFormat::kBf16 && internal::CpuHasAvx512Bf16();
    case ScorePath::kInt8Vnni:
      return format == RepresentationFormat::kInt8 && internal::CpuHasAvx512Vnni();
    case ScorePath::kAmxBf16:
      return format == RepresentationFormat::kBf16 && internal::CpuHasAmxBf16();
    case ScorePath::kAmxInt8:
      return format == RepresentationFormat::kInt8 && internal::CpuHasAmxInt8();
  }
  return false;
}

float ScoreRelativeTolerance(ScorePath path) {
  constexpr float kRounding = 1e-4f;
  // Twice the exp2 error, rounded up (a ratio of sums that each err by up to e errs by 2e/(1-e)).
  constexpr float kFastExp2 = 1.6e-4f;
  static_assert(kFastExp2 >= 2.0f * internal::kFastExp2RelativeError * 1.001f);
  switch (path) {
    case ScorePath::kBf16Dot:
    case ScorePath::kInt8Vnni:
    case ScorePath::kAmxBf16:
    case ScorePath::kAmxInt8:
      return kRounding + kFastExp2;
    default:
      return kRounding;
  }
}

void SetScorePath(ScorePath path) { forced_path.store(path, std::memory_order_relaxed); }

ScorePath ActiveScorePath(RepresentationFormat format) {
  const ScorePath forced = forced_path.load(std::memory_order_relaxed);
  if (forced != ScorePath::kAuto) {
    return ScorePathSupported(forced, format) ? forced : ScorePath::kHighway;
  }
  // Measured on the Sapphire Rapids class build host (bench/retrieval_bench, and register-resident
  // loops of independent instructions): vdpbf16ps retires at about 1/4 and vpdpbusd at about 1/2
  // of the vfmadd231ps rate, so neither x86 path beats the fp32 FMA kernel there (bf16-dot 0.6x,
  // int8-vnni, whose queries need two codes, 0.7x of int8 on Highway). They stay forcible.
  // amx-bf16 measured 1.9x Highway on the 16-core AMX host (Qwen2.5-14B 32K: 6.9 vs 13.0 ms per
  // retrieval in batches of 64; Llama-3-8B 3.4 vs 6.2 ms), with the same selections as the GEMV
  // baseline and the reference tests passing there: where the CPU has AMX, it scores bf16.
  // amx-int8, once its queries' two codes packed into 5 C tiles per vector at 40 rows (not 6)
  // and the low code in 1/256 steps, measured 8.9 ms there (Qwen2.5-14B 32K, batches of 64;
  // int8-vnni 12.9, Highway on bf16 12.2, amx-bf16 6.1 in the same run; Llama-3-8B 5.3 against
  // int8-vnni 6.8; docs/performance/retrieval-h200-int8-packed.txt): where the CPU has AMX-INT8,
  // it scores int8. Without AMX, int8 stays on Highway: int8-vnni's two query codes cost 16
  // vpdpbusd per 16 scores, no fewer multiply-adds than the fp32 FMAs on the widened codes.
  if (format == RepresentationFormat::kBf16 &&
      ScorePathSupported(ScorePath::kAmxBf16, RepresentationFormat::kBf16)) {
    return ScorePath::kAmxBf16;
  }
  if (format == RepresentationFormat::kInt8 &&
      ScorePathSupported(ScorePath::kAmxInt8, RepresentationFormat::kInt8)) {
    return ScorePath::kAmxInt8;
  }
  return ScorePath::kHighway;
}

void ScoreChunk(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                absl::Span<const float> gathered, size_t num_rows, uint32_t chunk,
                uint32_t num_chunks, absl::Span<float> partials, ScoreScratch& scratch) {
  const FlushDenormals flush;
  ChunkArgs args;
  const bool int8 = index.format() == RepresentationFormat::kInt8;
  if (int8) {
    args.codes = index.codes(layer, kv_head).data();
    args.code_scales = index.code_scales(layer, kv_head).data();
  } else {
    args.rep = index.representation(layer, kv_head).data();
  }
  args.group_norms = index.group_norms(layer, kv_head).data();
  args.num_blocks = index.num_blocks(layer);
  args.vectors = index.vectors_per_block();
  args.kept = index.kept();
  args.gathered = gathered.data();
  args.num_rows = num_rows;
  args.dot_scale = DotScale(index.shape());
  args.split_queries = index.shape().dtype != DType::kBf16;
  args.chunk = chunk;
  args.num_chunks = num_chunks;
  args.partials = partials.data();
  args.scratch = &scratch;
  switch (ActiveScorePath(index.format())) {
    case ScorePath::kBf16Dot:
      internal::ScoreChunkBf16Dot(args);
      break;
    case ScorePath::kInt8Vnni:
      internal::ScoreChunkInt8Vnni(args);
      break;
    case ScorePath::kAmxBf16:
      internal::ScoreChunkAmxBf16(args);
      break;
    case ScorePath::kAmxInt8:
      internal::ScoreChunkAmxInt8(args);
      break;
    default:
      HWY_DYNAMIC_DISPATCH(ScoreChunkImpl)(&args);
      break;
  }
}

void MergeChunks(uint32_t num_blocks, size_t num_rows, uint32_t num_chunks,
                 absl::Span<const float> partials, absl::Span<float> head_scores,
                 ScoreScratch& scratch, BlockVote vote) {
  const FlushDenormals flush;
  HWY_DYNAMIC_DISPATCH(MergeChunksImpl)
  (num_blocks, num_rows, num_chunks, partials.data(), head_scores.data(), &scratch,
   vote == BlockVote::kMax);
}

void ScoreKvHead(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                 absl::Span<const uint8_t> queries, uint32_t num_queries,
                 absl::Span<float> head_scores, ScoreScratch& scratch) {
  const uint32_t num_blocks = index.num_blocks(layer);
  const size_t num_rows = NumQueryRows(index, num_queries);
  const uint32_t num_chunks = ChunksPerHead(num_blocks);
  std::vector<float> gathered(GatheredQueryFloats(index, num_queries));
  GatherHeadQueries(index, layer, kv_head, queries, num_queries, absl::MakeSpan(gathered));
  const size_t partials_floats = HeadPartialsFloats(num_blocks, num_rows, num_chunks);
  auto partials = hwy::AllocateAligned<float>(partials_floats);
  for (uint32_t chunk = 0; chunk < num_chunks; ++chunk) {
    ScoreChunk(index, layer, kv_head, gathered, num_rows, chunk, num_chunks,
               absl::MakeSpan(partials.get(), partials_floats), scratch);
  }
  MergeChunks(num_blocks, num_rows, num_chunks,
              absl::MakeConstSpan(partials.get(), partials_floats), head_scores, scratch,
              index.knobs().block_vote);
}

absl::Status ScoreLayer(const SequenceIndex& index, uint32_t layer,
                        absl::Span<const uint8_t> queries, uint32_t num_queries,
                        std::vector<float>& block_scores) {
  if (absl::Status status = CheckScoreArgs(index, layer, queries, num_queries); !status.ok()) {
    return status;
  }
  const uint32_t num_blocks = index.num_blocks(layer);
  block_scores.assign(num_blocks, 0.0f);
  std::vector<float> head_scores(num_blocks);
  ScoreScratch scratch;
  for (uint32_t h = 0; h < index.shape().num_kv_heads; ++h) {
    ScoreKvHead(index, layer, h, queries, num_queries, absl::MakeSpan(head_scores), scratch);
    for (uint32_t b = 0; b < num_blocks; ++b) block_scores[b] += head_scores[b];
  }
  return absl::OkStatus();
}

}  // namespace kvstar::retrieval
#endif  // HWY_ONCE
