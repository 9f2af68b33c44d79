// The fused SIMD scorer against the scalar reference, on awkward and real model shapes.
#include "retrieval/scorer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "hwy/aligned_allocator.h"
#include "hwy/targets.h"
#include "retrieval/reference.h"
#include "retrieval/representation.h"
#include "retrieval/scorer_kernels.h"
#include "retrieval/topk.h"
#include "tests/retrieval/test_util.h"

namespace kvstar::retrieval {
namespace {

using testing::KeyBlocks;
using testing::RandomElements;

struct Case {
  std::string name;
  ModelShape shape;
  Knobs knobs;
  uint32_t num_blocks;
};

ModelShape Shape(uint32_t q_heads, uint32_t kv_heads, uint32_t dim, uint32_t block, DType dtype) {
  ModelShape shape;
  shape.num_layers = 2;
  shape.num_q_heads = q_heads;
  shape.num_kv_heads = kv_heads;
  shape.head_dim = dim;
  shape.block_size = block;
  shape.dtype = dtype;
  return shape;
}

Knobs MakeKnobs(float prune, uint32_t merge) {
  Knobs knobs;
  knobs.blk_repre_dim_prune_ratio = prune;
  knobs.blk_repre_inner_token_merge = merge;
  return knobs;
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    const std::string suffix = std::string("_") + DTypeName(dtype);
    cases.push_back({"dim72" + suffix, Shape(6, 2, 72, 16, dtype), MakeKnobs(0.25f, 2), 9});
    cases.push_back({"dim40_merge4" + suffix, Shape(4, 1, 40, 12, dtype), MakeKnobs(0.3f, 4), 7});
    cases.push_back({"kept1" + suffix, Shape(2, 2, 4, 8, dtype), MakeKnobs(0.25f, 2), 5});
    cases.push_back({"one_block" + suffix, Shape(4, 2, 32, 16, dtype), MakeKnobs(0.25f, 2), 1});
    cases.push_back({"under_windows" + suffix, Shape(4, 2, 32, 16, dtype), MakeKnobs(0.25f, 2), 3});
    cases.push_back(
        {"no_merge_full_dim" + suffix, Shape(3, 3, 24, 8, dtype), MakeKnobs(1.0f, 1), 11});
    // 33 kept channels: more than an AMX tile's 32, in two K steps of 9 pairs that overlap.
    cases.push_back({"kept33" + suffix, Shape(4, 2, 66, 16, dtype), MakeKnobs(0.5f, 2), 18});
  }
  cases.push_back({"kept64", Shape(8, 2, 128, 32, DType::kBf16), MakeKnobs(0.5f, 2), 17});
  // 96 kept channels: 24 quads, two AMX-INT8 K steps of 12 (and three AMX-BF16 steps of 16 pairs).
  cases.push_back({"kept96", Shape(4, 2, 128, 16, DType::kBf16), MakeKnobs(0.75f, 2), 19});
  cases.push_back({"qwen2.5_14b", Shape(40, 8, 128, 128, DType::kBf16), MakeKnobs(0.25f, 2), 7});
  cases.push_back({"llama3_8b", Shape(32, 8, 128, 128, DType::kBf16), MakeKnobs(0.25f, 2), 6});
  cases.push_back({"smollm2_135m", Shape(9, 3, 64, 128, DType::kBf16), MakeKnobs(0.25f, 2), 9});
  cases.push_back({"multi_head_8_8", Shape(8, 8, 64, 64, DType::kFp16), MakeKnobs(0.25f, 2), 8});
  return cases;
}

// Blocks that one selection has and the other lacks must sit at a near-tie of reference scores.
void ExpectSameSelectionAwayFromTies(const std::vector<uint32_t>& got,
                                     const std::vector<uint32_t>& want,
                                     const std::vector<float>& ref_scores, float tolerance) {
  ASSERT_EQ(got.size(), want.size());
  std::vector<uint32_t> only_got, only_want;
  std::set_difference(got.begin(), got.end(), want.begin(), want.end(),
                      std::back_inserter(only_got));
  std::set_difference(want.begin(), want.end(), got.begin(), got.end(),
                      std::back_inserter(only_want));
  ASSERT_EQ(only_got.size(), only_want.size());
  for (size_t i = 0; i < only_got.size(); ++i) {
    const float a = ref_scores[only_got[i]], b = ref_scores[only_want[i]];
    EXPECT_NEAR(a, b, tolerance * std::max(a, b))
        << "blocks " << only_got[i] << " vs " << only_want[i];
  }
}

// Scores `layer` of `index` (sealed from the case's keys) with nq random queries and compares
// scores and selection with the scalar reference. Sum votes add up to one share per query row;
// max votes to at most one share per KV head.
void ExpectLayerScoresMatchReference(const Case& c, const SequenceIndex& index, uint32_t layer,
                                     const std::vector<float>& rep,
                                     const std::vector<uint32_t>& channels, uint32_t nq,
                                     std::mt19937& rng) {
  SCOPED_TRACE(nq);
  const std::vector<uint8_t> queries =
      RandomElements(c.shape.dtype, size_t{nq} * c.shape.num_q_heads * c.shape.head_dim, rng, 3.0f);
  std::vector<float> scores;
  ASSERT_TRUE(ScoreLayer(index, layer, queries, nq, scores).ok());
  const std::vector<float> want =
      ReferenceScores(c.shape, c.knobs, rep, channels, c.num_blocks, queries, nq);
  ASSERT_EQ(scores.size(), want.size());
  const bool max_vote = c.knobs.block_vote == BlockVote::kMax;
  const float total = max_vote ? 1.0f : static_cast<float>(nq) * c.shape.num_q_heads;
  const float tolerance = ScoreRelativeTolerance(ActiveScorePath(c.knobs.representation_format));
  float sum = 0.0f;
  for (size_t b = 0; b < want.size(); ++b) {
    EXPECT_NEAR(scores[b], want[b], tolerance * want[b] + 1e-6f * total) << "block " << b;
    if (max_vote) {
      EXPECT_LE(scores[b], c.shape.num_kv_heads * (1.0f + tolerance)) << "block " << b;
    }
    sum += scores[b];
  }
  if (!max_vote) {
    EXPECT_NEAR(sum, total, tolerance * total);
  }
  ExpectSameSelectionAwayFromTies(SelectBlocks(scores, c.knobs), ReferenceSelect(want, c.knobs),
                                  want, tolerance);
}

void ExpectFusedScoresMatchReference(RepresentationFormat format = RepresentationFormat::kBf16) {
  std::mt19937 rng(7);
  for (Case c : Cases()) {
    SCOPED_TRACE(c.name);
    c.knobs.representation_format = format;
    auto index = SequenceIndex::Create(c.shape, c.knobs);
    ASSERT_TRUE(index.ok()) << index.status();
    KeyBlocks keys(c.shape, c.num_blocks, rng);
    ASSERT_TRUE((*index)->SealLayer(1, keys.spans).ok());
    const std::vector<uint32_t> channels = ReferenceKeptChannels(c.shape, c.knobs, keys.spans);
    for (uint32_t h = 0; h < c.shape.num_kv_heads; ++h) {
      const auto kept = (*index)->kept_channels(1, h);
      ASSERT_TRUE(std::equal(kept.begin(), kept.end(), channels.begin() + h * kept.size()));
    }
    const std::vector<float> rep = ReferenceRepresentation(c.shape, c.knobs, keys.spans, channels);
    for (uint32_t nq = 1; nq <= c.knobs.retrieval_stride; ++nq) {
      ExpectLayerScoresMatchReference(c, **index, 1, rep, channels, nq, rng);
    }
  }
}

// Every Highway target this CPU runs (AVX3, AVX2, SSE4, ..., EMU128/SCALAR), not just the best.
// Forces a scoring path for one test and restores the automatic choice after it.
class ForcePath {
 public:
  explicit ForcePath(ScorePath path) { SetScorePath(path); }
  ~ForcePath() { SetScorePath(ScorePath::kAuto); }
};

TEST(ScorerTest, FusedScoresMatchReferenceOnAwkwardAndModelShapesForEveryTarget) {
  const ForcePath highway(ScorePath::kHighway);
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    SCOPED_TRACE(hwy::TargetName(target));
    hwy::SetSupportedTargetsForTest(target);
    EXPECT_STREQ(DispatchedTargetName(), hwy::TargetName(target));
    ExpectFusedScoresMatchReference();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// BLOCK_VOTE_MAX: each block scores the largest share any query row gives it (per KV head), with
// up to kMaxSealQueries rows as a Seal may send.
void ExpectMaxVoteScoresMatchReference(RepresentationFormat format) {
  std::mt19937 rng(11);
  for (Case c : Cases()) {
    SCOPED_TRACE(c.name);
    c.knobs.block_vote = BlockVote::kMax;
    c.knobs.representation_format = format;
    {
      auto index = SequenceIndex::Create(c.shape, c.knobs);
      ASSERT_TRUE(index.ok()) << index.status();
      KeyBlocks keys(c.shape, c.num_blocks, rng);
      ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
      const std::vector<uint32_t> channels = ReferenceKeptChannels(c.shape, c.knobs, keys.spans);
      const std::vector<float> rep =
          ReferenceRepresentation(c.shape, c.knobs, keys.spans, channels);
      for (uint32_t nq : {1u, c.knobs.retrieval_stride, 37u, kMaxSealQueries}) {
        ExpectLayerScoresMatchReference(c, **index, 0, rep, channels, nq, rng);
      }
      std::vector<float> scores;
      const std::vector<uint8_t> too_many = RandomElements(
          c.shape.dtype, size_t{kMaxSealQueries + 1} * c.shape.num_q_heads * c.shape.head_dim, rng,
          3.0f);
      EXPECT_FALSE(ScoreLayer(**index, 0, too_many, kMaxSealQueries + 1, scores).ok());
    }
  }
}

TEST(ScorerTest, MaxVoteScoresMatchReferenceWithSealSizedQueryWindowsForEveryTarget) {
  const ForcePath highway(ScorePath::kHighway);
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    SCOPED_TRACE(hwy::TargetName(target));
    hwy::SetSupportedTargetsForTest(target);
    ExpectMaxVoteScoresMatchReference(RepresentationFormat::kBf16);
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Scores one layer by split-K with `num_chunks` chunks per head, running the chunks in reverse
// order (any order must give the same bits).
std::vector<float> SplitLayerScores(const SequenceIndex& index, uint32_t layer,
                                    absl::Span<const uint8_t> queries, uint32_t num_queries,
                                    uint32_t num_chunks, bool reverse) {
  const uint32_t num_blocks = index.num_blocks(layer);
  const size_t num_rows = NumQueryRows(index, num_queries);
  std::vector<float> gathered(GatheredQueryFloats(index, num_queries)), head_scores(num_blocks);
  std::vector<float> block_scores(num_blocks, 0.0f);
  const size_t partials_floats = HeadPartialsFloats(num_blocks, num_rows, num_chunks);
  auto partials = hwy::AllocateAligned<float>(partials_floats);
  ScoreScratch scratch;
  for (uint32_t h = 0; h < index.shape().num_kv_heads; ++h) {
    GatherHeadQueries(index, layer, h, queries, num_queries, absl::MakeSpan(gathered));
    for (uint32_t i = 0; i < num_chunks; ++i) {
      ScoreChunk(index, layer, h, gathered, num_rows, reverse ? num_chunks - 1 - i : i, num_chunks,
                 absl::MakeSpan(partials.get(), partials_floats), scratch);
    }
    MergeChunks(num_blocks, num_rows, num_chunks,
                absl::MakeConstSpan(partials.get(), partials_floats), absl::MakeSpan(head_scores),
                scratch);
    for (uint32_t b = 0; b < num_blocks; ++b) block_scores[b] += head_scores[b];
  }
  return block_scores;
}

// Split-K: every chunk count from 1 to one chunk per group matches the reference, including
// chunks whose maxima lie far apart (a dominant block in the first or the last chunk), and the
// order the chunks run in changes no bit.
void ExpectSplitScoresMatchReference(RepresentationFormat format = RepresentationFormat::kBf16) {
  const ModelShape shape = Shape(6, 2, 40, 16, DType::kFp32);
  Knobs knobs = MakeKnobs(0.3f, 2);
  knobs.representation_format = format;
  std::mt19937 rng(29);
  const uint32_t num_blocks = 75, nq = 3;  // 5 groups, the last one ragged
  for (int planted : {-1, 2, 73}) {
    SCOPED_TRACE(planted);
    KeyBlocks keys(shape, num_blocks, rng);
    const std::vector<uint8_t> queries =
        RandomElements(shape.dtype, size_t{nq} * shape.num_q_heads * shape.head_dim, rng, 2.0f);
    if (planted >= 0) {
      for (uint32_t t = 0; t < shape.block_size; ++t) {
        for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
          for (uint32_t c = 0; c < shape.head_dim; ++c) {
            const float q = LoadAsF32(shape.dtype, queries.data(),
                                      (h * shape.group_size()) * shape.head_dim + c);
            testing::StoreAs(shape.dtype, keys.bytes[planted].data(),
                             (size_t{t} * shape.num_kv_heads + h) * shape.head_dim + c, 20.0f * q);
          }
        }
      }
      keys.Refresh();
    }
    auto index = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(index.ok());
    ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
    const std::vector<uint32_t> channels = ReferenceKeptChannels(shape, knobs, keys.spans);
    const std::vector<float> want =
        ReferenceScores(shape, knobs, ReferenceRepresentation(shape, knobs, keys.spans, channels),
                        channels, num_blocks, queries, nq);
    const float total = static_cast<float>(nq) * shape.num_q_heads;
    const float tolerance = ScoreRelativeTolerance(ActiveScorePath(format));
    for (uint32_t num_chunks = 1; num_chunks <= 5; ++num_chunks) {
      SCOPED_TRACE(num_chunks);
      const std::vector<float> scores =
          SplitLayerScores(**index, 0, queries, nq, num_chunks, /*reverse=*/false);
      EXPECT_EQ(scores, SplitLayerScores(**index, 0, queries, nq, num_chunks, /*reverse=*/true));
      for (uint32_t b = 0; b < num_blocks; ++b) {
        EXPECT_NEAR(scores[b], want[b], tolerance * want[b] + 1e-6f * total) << "block " << b;
      }
      if (planted >= 0) {
        EXPECT_EQ(std::max_element(scores.begin(), scores.end()) - scores.begin(), planted);
      }
    }
  }
}

TEST(ScorerTest, SplitKScoresMatchReferenceForEveryChunkCountAndTarget) {
  const ForcePath highway(ScorePath::kHighway);
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    SCOPED_TRACE(hwy::TargetName(target));
    hwy::SetSupportedTargetsForTest(target);
    ExpectSplitScoresMatchReference();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// The int8 representation through the Highway kernel (the portable fallback), every target,
// against the reference scoring the same codes and the same quantized queries.
TEST(ScorerTest, Int8RepresentationMatchesReferenceForEveryTarget) {
  const ForcePath highway(ScorePath::kHighway);
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    SCOPED_TRACE(hwy::TargetName(target));
    hwy::SetSupportedTargetsForTest(target);
    ExpectFusedScoresMatchReference(RepresentationFormat::kInt8);
    ExpectMaxVoteScoresMatchReference(RepresentationFormat::kInt8);
    ExpectSplitScoresMatchReference(RepresentationFormat::kInt8);
  }
  hwy::SetSupportedTargetsForTest(0);
}

// The AVX512_BF16 path: bf16 queries exactly, fp16/fp32 ones as two bf16 parts.
TEST(ScorerTest, Bf16DotPathMatchesReferenceOnAwkwardAndModelShapes) {
  if (!ScorePathSupported(ScorePath::kBf16Dot, RepresentationFormat::kBf16)) {
    GTEST_SKIP() << "this CPU has no AVX512_BF16: the bf16-dot path cannot run here";
  }
  const ForcePath bf16_dot(ScorePath::kBf16Dot);
  ASSERT_EQ(ActiveScorePath(RepresentationFormat::kBf16), ScorePath::kBf16Dot);
  ExpectFusedScoresMatchReference(RepresentationFormat::kBf16);
  ExpectMaxVoteScoresMatchReference(RepresentationFormat::kBf16);
  ExpectSplitScoresMatchReference(RepresentationFormat::kBf16);
}

// The AMX-BF16 path: the same queries as the bf16-dot path, as tile products.
TEST(ScorerTest, AmxBf16PathMatchesReferenceOnAwkwardAndModelShapes) {
  if (!ScorePathSupported(ScorePath::kAmxBf16, RepresentationFormat::kBf16)) {
    GTEST_SKIP() << "this CPU has no AMX-TILE/AMX-BF16 (or the OS refused the tile state): the "
                    "amx-bf16 path cannot run here";
  }
  const ForcePath amx(ScorePath::kAmxBf16);
  ASSERT_EQ(ActiveScorePath(RepresentationFormat::kBf16), ScorePath::kAmxBf16);
  ExpectFusedScoresMatchReference(RepresentationFormat::kBf16);
  ExpectMaxVoteScoresMatchReference(RepresentationFormat::kBf16);
  ExpectSplitScoresMatchReference(RepresentationFormat::kBf16);
}

TEST(ScorerTest, Int8VnniPathMatchesReferenceOnAwkwardAndModelShapes) {
  if (!ScorePathSupported(ScorePath::kInt8Vnni, RepresentationFormat::kInt8)) {
    GTEST_SKIP() << "this CPU has no AVX512_VNNI: the int8-vnni path cannot run here";
  }
  const ForcePath vnni(ScorePath::kInt8Vnni);
  ASSERT_EQ(ActiveScorePath(RepresentationFormat::kInt8), ScorePath::kInt8Vnni);
  ExpectFusedScoresMatchReference(RepresentationFormat::kInt8);
  ExpectMaxVoteScoresMatchReference(RepresentationFormat::kInt8);
  ExpectSplitScoresMatchReference(RepresentationFormat::kInt8);
}

// The AMX-INT8 path: the VNNI path's integer dots as tile products, high and low query codes as
// separate tile rows.
TEST(ScorerTest, AmxInt8PathMatchesReferenceOnAwkwardAndModelShapes) {
  if (!ScorePathSupported(ScorePath::kAmxInt8, RepresentationFormat::kInt8)) {
    GTEST_SKIP() << "this CPU has no AMX-TILE/AMX-INT8 (or the OS refused the tile state): the "
                    "amx-int8 path cannot run here";
  }
  const ForcePath amx(ScorePath::kAmxInt8);
  ASSERT_EQ(ActiveScorePath(RepresentationFormat::kInt8), ScorePath::kAmxInt8);
  ExpectFusedScoresMatchReference(RepresentationFormat::kInt8);
  ExpectMaxVoteScoresMatchReference(RepresentationFormat::kInt8);
  ExpectSplitScoresMatchReference(RepresentationFormat::kInt8);
}

// The x86 paths' exp2 stays within the error that ScoreRelativeTolerance allows for, over the
// whole range the scan feeds it (down to where FTZ flushes, up to the reference's headroom), and
// underflows to zero below it.
TEST(ScorerTest, FastExp2StaysWithinItsRelativeErrorBound) {
  if (!internal::CpuHasAvx512Bf16()) {
    GTEST_SKIP() << "this CPU has no AVX512_BF16: the x86 paths' exp2 cannot run here";
  }
  std::vector<float> x;
  for (double v = -126.0; v <= internal::kHeadroom; v += 1.0 / 4099) {
    x.push_back(static_cast<float>(v));
  }
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, -0.5f, 19.999f, -125.999f}) x.push_back(v);
  std::vector<float> got(x.size());
  internal::FastExp2(x.data(), got.data(), x.size());
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp2(static_cast<double>(x[i]));
    worst = std::max(worst, std::fabs(got[i] / want - 1.0));
  }
  std::printf("fast exp2: largest relative error %.3g over %zu values (bound %.3g)\n", worst,
              x.size(), internal::kFastExp2RelativeError);
  EXPECT_LE(worst, internal::kFastExp2RelativeError);
  float tiny[3] = {-200.0f, -1000.0f, -HUGE_VALF}, out[3];
  internal::FastExp2(tiny, out, 3);
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

// Every path scores the same index to the same values (within rounding), on a Qwen-shaped layer
// of several groups and chunks.
TEST(ScorerTest, EveryPathAgreesWithTheHighwayKernel) {
  const ModelShape shape = Shape(40, 8, 128, 128, DType::kBf16);
  std::mt19937 rng(5);
  KeyBlocks keys(shape, 150, rng);
  const auto queries =
      RandomElements(shape.dtype, size_t{8} * shape.num_q_heads * shape.head_dim, rng, 3.0f);
  for (RepresentationFormat format : {RepresentationFormat::kBf16, RepresentationFormat::kInt8}) {
    SCOPED_TRACE(RepresentationFormatName(format));
    Knobs knobs;
    knobs.representation_format = format;
    auto index = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(index.ok());
    ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
    std::vector<float> highway_scores;
    {
      const ForcePath highway(ScorePath::kHighway);
      ASSERT_TRUE(ScoreLayer(**index, 0, queries, 8, highway_scores).ok());
    }
    for (ScorePath path :
         {ScorePath::kBf16Dot, ScorePath::kInt8Vnni, ScorePath::kAmxBf16, ScorePath::kAmxInt8}) {
      if (!ScorePathSupported(path, format)) continue;
      SCOPED_TRACE(ScorePathName(path));
      const ForcePath forced(path);
      std::vector<float> scores;
      ASSERT_TRUE(ScoreLayer(**index, 0, queries, 8, scores).ok());
      ASSERT_EQ(scores.size(), highway_scores.size());
      const float tolerance =
          ScoreRelativeTolerance(path) + ScoreRelativeTolerance(ScorePath::kHighway);
      for (size_t b = 0; b < scores.size(); ++b) {
        EXPECT_NEAR(scores[b], highway_scores[b], tolerance * highway_scores[b] + 1e-5f) << b;
      }
    }
  }
}

TEST(ScorerTest, ForcedPathFallsBackToHighwayForAFormatItCannotScore) {
  {
    const ForcePath vnni(ScorePath::kInt8Vnni);
    EXPECT_EQ(ActiveScorePath(RepresentationFormat::kBf16), ScorePath::kHighway);
  }
  {
    const ForcePath bf16_dot(ScorePath::kBf16Dot);
    EXPECT_EQ(ActiveScorePath(RepresentationFormat::kInt8), ScorePath::kHighway);
  }
  {
    const ForcePath amx(ScorePath::kAmxBf16);
    EXPECT_FALSE(ScorePathSupported(ScorePath::kAmxBf16, RepresentationFormat::kInt8));
    EXPECT_EQ(ActiveScorePath(RepresentationFormat::kInt8), ScorePath::kHighway);
  }
  {
    const ForcePath amx(ScorePath::kAmxInt8);
    EXPECT_FALSE(ScorePathSupported(ScorePath::kAmxInt8, RepresentationFormat::kBf16));
    EXPECT_EQ(ActiveScorePath(RepresentationFormat::kBf16), ScorePath::kHighway);
  }
  EXPECT_NE(ActiveScorePath(RepresentationFormat::kBf16), ScorePath::kAuto);
  // The automatic choice: AMX tiles where the CPU has them (AMX-BF16 for bf16, AMX-INT8 for
  // int8), else Highway (see ActiveScorePath for what was measured).
  EXPECT_EQ(ActiveScorePath(RepresentationFormat::kBf16),
            ScorePathSupported(ScorePath::kAmxBf16, RepresentationFormat::kBf16)
                ? ScorePath::kAmxBf16
                : ScorePath::kHighway);
  EXPECT_EQ(ActiveScorePath(RepresentationFormat::kInt8),
            ScorePathSupported(ScorePath::kAmxInt8, RepresentationFormat::kInt8)
                ? ScorePath::kAmxInt8
                : ScorePath::kHighway);
  std::printf(
      "automatic paths here: bf16 -> %s, int8 -> %s; amx-bf16 %s, amx-int8 %s\n",
      ScorePathName(ActiveScorePath(RepresentationFormat::kBf16)),
      ScorePathName(ActiveScorePath(RepresentationFormat::kInt8)),
      ScorePathSupported(ScorePath::kAmxBf16, RepresentationFormat::kBf16) ? "supported"
                                                                           : "not supported",
      ScorePathSupported(ScorePath::kAmxInt8, RepresentationFormat::kInt8) ? "supported"
                                                                           : "not supported");
}

TEST(ScorerTest, ChunksPerHeadKeepsChunksOfAtLeastFourGroups) {
  EXPECT_EQ(ChunksPerHead(1), 1u);
  EXPECT_EQ(ChunksPerHead(112), 1u);   // 7 groups
  EXPECT_EQ(ChunksPerHead(128), 2u);   // 8 groups
  EXPECT_EQ(ChunksPerHead(256), 4u);   // 32K context at block 128: 16 groups
  EXPECT_EQ(ChunksPerHead(1024), 4u);  // 128K: chunks of 16 groups
}

TEST(ScorerTest, PlantedBlockMatchingTheQueriesIsSelected) {
  const ModelShape shape = Shape(8, 2, 64, 32, DType::kBf16);
  Knobs knobs;
  knobs.sparse_ratio = 0.1f;
  std::mt19937 rng(11);
  const uint32_t num_blocks = 40, planted = 17, nq = 4;
  KeyBlocks keys(shape, num_blocks, rng);
  std::vector<uint8_t> queries =
      RandomElements(shape.dtype, size_t{nq} * shape.num_q_heads * shape.head_dim, rng);
  // Every key of the planted block points along the first query of its KV head's group.
  for (uint32_t t = 0; t < shape.block_size; ++t) {
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      for (uint32_t c = 0; c < shape.head_dim; ++c) {
        const float q =
            LoadAsF32(shape.dtype, queries.data(), (h * shape.group_size()) * shape.head_dim + c);
        testing::StoreAs(shape.dtype, keys.bytes[planted].data(),
                         (size_t{t} * shape.num_kv_heads + h) * shape.head_dim + c, 4.0f * q);
      }
    }
  }
  keys.Refresh();
  auto index = SequenceIndex::Create(shape, knobs);
  ASSERT_TRUE(index.ok());
  ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
  std::vector<float> scores;
  ASSERT_TRUE(ScoreLayer(**index, 0, queries, nq, scores).ok());
  const std::vector<uint32_t> selected = SelectBlocks(scores, knobs);
  EXPECT_EQ(selected.size(), 1 + 2 + NumSelectedMiddle(num_blocks, knobs));
  EXPECT_TRUE(std::binary_search(selected.begin(), selected.end(), planted));
  EXPECT_EQ(std::max_element(scores.begin(), scores.end()) - scores.begin(), planted);
  EXPECT_EQ(selected, ReferenceRetrieveLayer(shape, knobs, keys.spans, queries, nq));
}

// The running reference max moves far (beyond the scorer's headroom) in a late group, after
// earlier groups were summed against a much lower one; their partial sums must be rescaled.
TEST(ScorerTest, LateDominantBlockMatchesReference) {
  const ModelShape shape = Shape(8, 2, 64, 32, DType::kFp32);
  const Knobs knobs;
  std::mt19937 rng(13);
  const uint32_t num_blocks = 40, late = 37, nq = 3;
  KeyBlocks keys(shape, num_blocks, rng);
  std::vector<uint8_t> queries =
      RandomElements(shape.dtype, size_t{nq} * shape.num_q_heads * shape.head_dim, rng);
  for (float strength : {3.0f, 8.0f, 30.0f}) {
    SCOPED_TRACE(strength);
    for (uint32_t t = 0; t < shape.block_size; ++t) {
      for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
        for (uint32_t c = 0; c < shape.head_dim; ++c) {
          const float q =
              LoadAsF32(shape.dtype, queries.data(), (h * shape.group_size()) * shape.head_dim + c);
          testing::StoreAs(shape.dtype, keys.bytes[late].data(),
                           (size_t{t} * shape.num_kv_heads + h) * shape.head_dim + c,
                           strength * q + (t % 3 == 0 ? 0.5f : -0.25f));
        }
      }
    }
    keys.Refresh();
    auto index = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(index.ok());
    ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
    std::vector<float> scores;
    ASSERT_TRUE(ScoreLayer(**index, 0, queries, nq, scores).ok());
    const std::vector<uint32_t> channels = ReferenceKeptChannels(shape, knobs, keys.spans);
    const std::vector<float> want =
        ReferenceScores(shape, knobs, ReferenceRepresentation(shape, knobs, keys.spans, channels),
                        channels, num_blocks, queries, nq);
    const float total = static_cast<float>(nq) * shape.num_q_heads;
    const float tolerance = ScoreRelativeTolerance(ActiveScorePath(knobs.representation_format));
    for (uint32_t b = 0; b < num_blocks; ++b) {
      EXPECT_NEAR(scores[b], want[b], tolerance * want[b] + 1e-6f * total) << "block " << b;
    }
    EXPECT_EQ(std::max_element(scores.begin(), scores.end()) - scores.begin(), late);
  }
}

TEST(ScorerTest, AppendBlockScoresLikeSealingWithTheBlock) {
  const ModelShape shape = Shape(10, 2, 48, 16, DType::kFp16);
  const Knobs knobs;
  std::mt19937 rng(3);
  // The prompt ends inside the first group of 16 blocks; appends fill it and start the second.
  KeyBlocks keys(shape, 19, rng);
  auto sealed_then_appended = SequenceIndex::Create(shape, knobs);
  auto sealed_at_once = SequenceIndex::Create(shape, knobs);
  ASSERT_TRUE(sealed_then_appended.ok() && sealed_at_once.ok());
  const auto prompt = absl::MakeConstSpan(keys.spans).subspan(0, 10);
  ASSERT_TRUE((*sealed_then_appended)->SealLayer(0, prompt).ok());
  for (size_t b = 10; b < keys.spans.size(); ++b) {
    ASSERT_TRUE((*sealed_then_appended)->AppendBlock(0, keys.spans[b]).ok());
  }
  std::vector<uint32_t> channels;
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    const auto kept = (*sealed_then_appended)->kept_channels(0, h);
    channels.insert(channels.end(), kept.begin(), kept.end());
  }
  ASSERT_TRUE((*sealed_at_once)->SealLayerWithChannels(0, keys.spans, channels).ok());
  EXPECT_EQ((*sealed_then_appended)->num_blocks(0), 19u);
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    EXPECT_TRUE(std::equal((*sealed_then_appended)->representation(0, h).begin(),
                           (*sealed_then_appended)->representation(0, h).end(),
                           (*sealed_at_once)->representation(0, h).begin(),
                           (*sealed_at_once)->representation(0, h).end()));
    EXPECT_TRUE(std::equal((*sealed_then_appended)->group_norms(0, h).begin(),
                           (*sealed_then_appended)->group_norms(0, h).end(),
                           (*sealed_at_once)->group_norms(0, h).begin(),
                           (*sealed_at_once)->group_norms(0, h).end()));
  }
  const auto queries =
      RandomElements(shape.dtype, size_t{8} * shape.num_q_heads * shape.head_dim, rng);
  std::vector<float> appended_scores, at_once_scores;
  ASSERT_TRUE(ScoreLayer(**sealed_then_appended, 0, queries, 8, appended_scores).ok());
  ASSERT_TRUE(ScoreLayer(**sealed_at_once, 0, queries, 8, at_once_scores).ok());
  EXPECT_EQ(appended_scores, at_once_scores);
}

TEST(ScorerTest, RejectsBadQueriesAndUnsealedLayers) {
  const ModelShape shape = Shape(4, 2, 32, 16, DType::kBf16);
  auto index = SequenceIndex::Create(shape, Knobs());
  ASSERT_TRUE(index.ok());
  std::vector<uint8_t> queries(shape.query_bytes(2));
  std::vector<float> scores;
  EXPECT_EQ(ScoreLayer(**index, 0, queries, 2, scores).code(),
            absl::StatusCode::kFailedPrecondition);
  std::mt19937 rng(1);
  KeyBlocks keys(shape, 4, rng);
  ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
  EXPECT_TRUE(ScoreLayer(**index, 0, queries, 2, scores).ok());
  EXPECT_EQ(ScoreLayer(**index, 0, queries, 3, scores).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreLayer(**index, 0, {}, 0, scores).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreLayer(**index, 2, queries, 2, scores).code(), absl::StatusCode::kInvalidArgument);
  // Up to kMaxSealQueries queries (a Seal's window) are scored; more are refused.
  std::vector<uint8_t> seal_window(shape.query_bytes(kMaxSealQueries));
  EXPECT_TRUE(ScoreLayer(**index, 0, seal_window, kMaxSealQueries, scores).ok());
  std::vector<uint8_t> too_many(shape.query_bytes(kMaxSealQueries + 1));
  EXPECT_EQ(ScoreLayer(**index, 0, too_many, kMaxSealQueries + 1, scores).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ScorerTest, DispatchesToASimdTarget) {
  hwy::SetSupportedTargetsForTest(0);
  const std::string target = DispatchedTargetName();
  std::printf("Highway dispatched target: %s\n", target.c_str());
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) {
    EXPECT_NE(target, "SCALAR");
    EXPECT_NE(target, "EMU128");
  }
#endif
}

}  // namespace
}  // namespace kvstar::retrieval
