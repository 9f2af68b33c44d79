#include "retrieval/scorer.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "retrieval/convert.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "retrieval/scorer.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace kvstar::retrieval {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// 2^x for x <= 0 (softmax arguments), relative error ~1.2e-7: degree-6 Taylor polynomial of
// 2^f on f in [-0.5, 0.5] times 2^n built in the exponent bits. Cheaper than hwy's Exp, which
// handles the full range; below 2^-127 it returns 0.
HWY_INLINE VF Exp2NonPositive(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  x = hn::Max(x, hn::Set(df, -127.0f));
  const VF n = hn::Round(x);
  const VF f = hn::Sub(x, n);
  VF p = hn::Set(df, 1.5403530393381608e-4f);
  p = hn::MulAdd(p, f, hn::Set(df, 1.3333558146428443e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.6181291076284772e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.5504108664821580e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4022650695910071e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.9314718055994531e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0f));
  const auto biased = hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127));
  return hn::Mul(p, hn::BitCast(df, hn::ShiftLeft<23>(biased)));
}

// Register-blocked micro-kernel: kRows representation rows x kVecs query vectors (each lane a
// query row). For every kept channel, kVecs query loads and kRows broadcasts feed
// kRows * kVecs FMAs. Arrays of vectors need sized vector types (all x86/NEON targets).
template <size_t kRows, size_t kVecs>
HWY_INLINE void ScoreTile(DF df, const float* HWY_RESTRICT rep, size_t kept,
                          const float* HWY_RESTRICT query_t, size_t padded_rows,
                          float* HWY_RESTRICT tile) {
  const size_t lanes = hn::Lanes(df);
  // Fully unrolled so the accumulators live in registers.
  VF acc[kRows][kVecs];
  HWY_UNROLL(8)
  for (size_t r = 0; r < kRows; ++r) {
    HWY_UNROLL(4)
    for (size_t v = 0; v < kVecs; ++v) acc[r][v] = hn::Zero(df);
  }
  for (size_t c = 0; c < kept; ++c) {
    VF q[kVecs];
    HWY_UNROLL(4)
    for (size_t v = 0; v < kVecs; ++v) q[v] = hn::Load(df, query_t + c * padded_rows + v * lanes);
    HWY_UNROLL(8)
    for (size_t r = 0; r < kRows; ++r) {
      const VF k = hn::Set(df, rep[r * kept + c]);
      HWY_UNROLL(4)
      for (size_t v = 0; v < kVecs; ++v) acc[r][v] = hn::MulAdd(q[v], k, acc[r][v]);
    }
  }
  HWY_UNROLL(8)
  for (size_t r = 0; r < kRows; ++r) {
    HWY_UNROLL(4)
    for (size_t v = 0; v < kVecs; ++v) hn::Store(acc[r][v], df, tile + r * padded_rows + v * lanes);
  }
}

template <size_t kRows>
HWY_INLINE void ScoreRows(DF df, const float* rep, size_t kept, const float* query_t,
                          size_t padded_rows, float* tile) {
  const size_t lanes = hn::Lanes(df);
  const size_t vecs = padded_rows / lanes;
  size_t v = 0;
  for (; v + 3 <= vecs; v += 3) {
    ScoreTile<kRows, 3>(df, rep, kept, query_t + v * lanes, padded_rows, tile + v * lanes);
  }
  if (vecs - v == 2) ScoreTile<kRows, 2>(df, rep, kept, query_t + v * lanes, padded_rows, tile + v * lanes);
  if (vecs - v == 1) ScoreTile<kRows, 1>(df, rep, kept, query_t + v * lanes, padded_rows, tile + v * lanes);
}

// `queries`: [num_rows][kept] fp32, already scaled by log2(e) / sqrt(head_dim) so that the
// softmax is computed with exp2. `rep`: bf16 [num_blocks][vectors][kept].
//
// Per block, the scores of its M vectors against all rows go to a tile [M][padded_rows] that
// stays in L1; a second pass over the tile takes the block max per row, moves the running max,
// rescales the running denominator and sums exp2(s - max) per row. Each block keeps its partial
// sums and the max they are relative to, so earlier blocks are rescaled once, at the end, not
// every time the max moves. This keeps one exp per score, which next to the FMAs is the cost.
void ScoreHeadImpl(const uint16_t* HWY_RESTRICT rep, size_t num_blocks, size_t vectors,
                   size_t kept, const float* HWY_RESTRICT queries, size_t num_rows,
                   float* HWY_RESTRICT head_scores, ScoreScratch* scratch) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const size_t padded_rows = hwy::RoundUpTo(num_rows, lanes);
  const size_t vecs = padded_rows / lanes;
  const size_t align = 64 / sizeof(float);
  const size_t query_t_size = hwy::RoundUpTo(kept * padded_rows, align);
  const size_t rep_size = hwy::RoundUpTo(vectors * kept + lanes, align);
  const size_t tile_size = hwy::RoundUpTo(vectors * padded_rows, align);
  const size_t partial_size = num_blocks * padded_rows;
  float* query_t = scratch->Get(query_t_size + rep_size + tile_size + 2 * partial_size +
                                3 * padded_rows);
  float* rep_f32 = query_t + query_t_size;
  float* tile = rep_f32 + rep_size;
  float* partial_sum = tile + tile_size;
  float* partial_max = partial_sum + partial_size;
  float* running_max = partial_max + partial_size;
  float* running_sum = running_max + padded_rows;
  float* inverse_sum = running_sum + padded_rows;

  // Transpose queries to [kept][padded_rows]; padded rows are zero and masked at the end.
  std::memset(query_t, 0, kept * padded_rows * sizeof(float));
  for (size_t row = 0; row < num_rows; ++row) {
    for (size_t c = 0; c < kept; ++c) query_t[c * padded_rows + row] = queries[row * kept + c];
  }
  for (size_t v = 0; v < vecs; ++v) {
    hn::Store(hn::Set(df, -std::numeric_limits<float>::infinity()), df, running_max + v * lanes);
    hn::Store(hn::Zero(df), df, running_sum + v * lanes);
  }

  const hn::Rebind<hwy::bfloat16_t, DF> dbf;
  const size_t block_elems = vectors * kept;
  const auto* rep_bf = reinterpret_cast<const hwy::bfloat16_t*>(rep);
  for (size_t b = 0; b < num_blocks; ++b) {
    // Widen this block to fp32 once; the micro-kernel then broadcasts from L1.
    const hwy::bfloat16_t* src = rep_bf + b * block_elems;
    size_t i = 0;
    for (; i + lanes <= block_elems; i += lanes) {
      hn::Store(hn::PromoteTo(df, hn::LoadU(dbf, src + i)), df, rep_f32 + i);
    }
    for (; i < block_elems; ++i) rep_f32[i] = Bf16ToF32(rep[b * block_elems + i]);

    size_t m = 0;
    for (; m + 4 <= vectors; m += 4) {
      ScoreRows<4>(df, rep_f32 + m * kept, kept, query_t, padded_rows, tile + m * padded_rows);
    }
    for (; m < vectors; ++m) {
      ScoreRows<1>(df, rep_f32 + m * kept, kept, query_t, padded_rows, tile + m * padded_rows);
    }

    for (size_t v = 0; v < vecs; ++v) {
      const float* column = tile + v * lanes;
      VF block_max = hn::Load(df, column);
      for (size_t r = 1; r < vectors; ++r) {
        block_max = hn::Max(block_max, hn::Load(df, column + r * padded_rows));
      }
      const VF old_max = hn::Load(df, running_max + v * lanes);
      const VF new_max = hn::Max(old_max, block_max);
      VF sum0 = hn::Zero(df);
      VF sum1 = hn::Zero(df);
      size_t r = 0;
      for (; r + 2 <= vectors; r += 2) {
        sum0 = hn::Add(sum0, Exp2NonPositive(df, hn::Sub(hn::Load(df, column + r * padded_rows), new_max)));
        sum1 = hn::Add(sum1, Exp2NonPositive(df, hn::Sub(hn::Load(df, column + (r + 1) * padded_rows), new_max)));
      }
      if (r < vectors) {
        sum0 = hn::Add(sum0, Exp2NonPositive(df, hn::Sub(hn::Load(df, column + r * padded_rows), new_max)));
      }
      const VF block_sum = hn::Add(sum0, sum1);
      const VF rescaled = hn::Mul(hn::Load(df, running_sum + v * lanes),
                                  Exp2NonPositive(df, hn::Sub(old_max, new_max)));
      hn::Store(hn::Add(rescaled, block_sum), df, running_sum + v * lanes);
      hn::Store(new_max, df, running_max + v * lanes);
      hn::Store(block_sum, df, partial_sum + b * padded_rows + v * lanes);
      hn::Store(new_max, df, partial_max + b * padded_rows + v * lanes);
    }
  }

  // 1 / denominator per row; zero for padded rows so they drop out of the vote.
  for (size_t row = 0; row < padded_rows; ++row) {
    inverse_sum[row] = row < num_rows ? 1.0f / running_sum[row] : 0.0f;
  }
  for (size_t b = 0; b < num_blocks; ++b) {
    VF acc = hn::Zero(df);
    for (size_t v = 0; v < vecs; ++v) {
      const size_t at = b * padded_rows + v * lanes;
      const VF scale = hn::Mul(hn::Load(df, inverse_sum + v * lanes),
                               Exp2NonPositive(df, hn::Sub(hn::Load(df, partial_max + at),
                                                           hn::Load(df, running_max + v * lanes))));
      acc = hn::MulAdd(hn::Load(df, partial_sum + at), scale, acc);
    }
    head_scores[b] = hn::GetLane(hn::SumOfLanes(df, acc));
  }
}

int64_t TargetImpl() { return HWY_TARGET; }

}  // namespace HWY_NAMESPACE
}  // namespace kvstar::retrieval
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvstar::retrieval {

HWY_EXPORT(ScoreHeadImpl);
HWY_EXPORT(TargetImpl);

const char* DispatchedTargetName() {
  return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetImpl)());
}

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
  if (num_queries == 0 || num_queries > index.knobs().retrieval_stride) {
    return absl::InvalidArgumentError(absl::StrCat("num_queries = ", num_queries,
                                                   ": must be in [1, retrieval_stride = ",
                                                   index.knobs().retrieval_stride, "]"));
  }
  if (queries.size() != shape.query_bytes(num_queries)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries of layer ", layer, " have ", queries.size(), " bytes, expected ",
        shape.query_bytes(num_queries), " ([", num_queries, "][", shape.num_q_heads, "][",
        shape.head_dim, "] ", DTypeName(shape.dtype), ")"));
  }
  if (!index.sealed(layer)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " is not sealed"));
  }
  return absl::OkStatus();
}

void ScoreKvHead(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                 absl::Span<const uint8_t> queries, uint32_t num_queries,
                 absl::Span<float> head_scores, ScoreScratch& scratch) {
  const ModelShape& shape = index.shape();
  const uint32_t group = shape.group_size();
  const uint32_t kept = index.kept();
  const size_t num_rows = size_t{num_queries} * group;
  // Gather the group's queries on the kept channels, pre-scaled for the exp2 softmax.
  thread_local std::vector<float> gathered;
  gathered.resize(num_rows * kept);
  const float scale = static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(shape.head_dim)));
  const absl::Span<const uint32_t> channels = index.kept_channels(layer, kv_head);
  for (uint32_t token = 0; token < num_queries; ++token) {
    for (uint32_t g = 0; g < group; ++g) {
      const size_t q_head = size_t{kv_head} * group + g;
      const size_t base = (size_t{token} * shape.num_q_heads + q_head) * shape.head_dim;
      float* row = &gathered[(size_t{token} * group + g) * kept];
      for (uint32_t j = 0; j < kept; ++j) {
        row[j] = scale * LoadAsF32(shape.dtype, queries.data(), base + channels[j]);
      }
    }
  }
  HWY_DYNAMIC_DISPATCH(ScoreHeadImpl)
  (index.representation(layer, kv_head).data(), index.num_blocks(layer),
   index.vectors_per_block(), kept, gathered.data(), num_rows, head_scores.data(), &scratch);
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
