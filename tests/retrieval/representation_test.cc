#include "retrieval/representation.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "retrieval/convert.h"
#include "retrieval/quantize.h"
#include "retrieval/reference.h"
#include "tests/retrieval/test_util.h"

namespace kvstar::retrieval {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ModelShape SmallShape() {
  ModelShape shape;
  shape.num_layers = 3;
  shape.num_q_heads = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 8;
  shape.block_size = 4;
  shape.dtype = DType::kFp32;
  return shape;
}

TEST(ValidationTest, AcceptsDefaultsAndRealModels) {
  Knobs knobs;
  ModelShape qwen{48, 40, 8, 128, 128, DType::kBf16};
  ModelShape smollm{30, 9, 3, 64, 128, DType::kFp16};
  EXPECT_TRUE(ValidateShapeAndKnobs(qwen, knobs).ok());
  EXPECT_TRUE(ValidateShapeAndKnobs(smollm, knobs).ok());
}

TEST(ValidationTest, RejectsBadFieldsNamingThem) {
  const ModelShape good = SmallShape();
  const Knobs knobs;
  auto expect_bad = [](const ModelShape& shape, const Knobs& k, const char* field) {
    const absl::Status status = ValidateShapeAndKnobs(shape, k);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(status.message()), HasSubstr(field));
  };
  ModelShape s = good;
  s.num_layers = 0;
  expect_bad(s, knobs, "num_layers = 0");
  s = good;
  s.head_dim = 0;
  expect_bad(s, knobs, "head_dim = 0");
  s = good;
  s.block_size = 0;
  expect_bad(s, knobs, "block_size = 0");
  s = good;
  s.num_q_heads = 5;
  expect_bad(s, knobs, "num_q_heads = 5");
  Knobs k = knobs;
  k.blk_repre_inner_token_merge = 3;  // does not divide block_size 4
  expect_bad(good, k, "blk_repre_inner_token_merge = 3");
  k = knobs;
  k.sparse_ratio = 0.0f;
  expect_bad(good, k, "sparse_ratio");
  k.sparse_ratio = 1.5f;
  expect_bad(good, k, "sparse_ratio");
  k = knobs;
  k.blk_repre_dim_prune_ratio = 0.05f;  // 8 * 0.05 rounds to 0 channels
  expect_bad(good, k, "blk_repre_dim_prune_ratio");
  k = knobs;
  k.retrieval_stride = 0;
  expect_bad(good, k, "retrieval_stride = 0");
  EXPECT_FALSE(SequenceIndex::Create(good, k).ok());
  k = knobs;
  k.representation_format = static_cast<RepresentationFormat>(5);
  expect_bad(good, k, "representation_format = 5");
}

TEST(RepresentationTest, KeepsTheChannelsWithLargestMeanAbsKey) {
  const ModelShape shape = SmallShape();
  Knobs knobs;
  knobs.blk_repre_dim_prune_ratio = 0.375f;  // 3 of 8 channels
  // Head 0: magnitudes grow with the channel (signs alternate); head 1: channels 1, 4, 6 big.
  std::vector<float> block(size_t{shape.block_size} * shape.num_kv_heads * shape.head_dim);
  for (uint32_t t = 0; t < shape.block_size; ++t) {
    for (uint32_t c = 0; c < shape.head_dim; ++c) {
      const float sign = (t + c) % 2 ? -1.0f : 1.0f;
      block[(t * 2 + 0) * 8 + c] = sign * (1.0f + c);
      block[(t * 2 + 1) * 8 + c] = sign * ((c == 1 || c == 4 || c == 6) ? 10.0f : 0.5f);
    }
  }
  const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(block.data()),
                                        block.size() * sizeof(float));
  auto index = SequenceIndex::Create(shape, knobs);
  ASSERT_TRUE(index.ok());
  ASSERT_TRUE((*index)->SealLayer(2, {bytes}).ok());
  EXPECT_THAT((*index)->kept_channels(2, 0), ElementsAre(5, 6, 7));
  EXPECT_THAT((*index)->kept_channels(2, 1), ElementsAre(1, 4, 6));
  // Merge 2: token pairs have opposite signs, so every mean is 0.
  for (uint16_t v : (*index)->representation(2, 1)) EXPECT_EQ(Bf16ToF32(v), 0.0f);
  // One block, 2 vectors of 3 channels, stored as one group of 2 channel pairs.
  EXPECT_EQ((*index)->representation(2, 0).size(), (*index)->values_per_group());
  EXPECT_EQ((*index)->values_per_group(), size_t{SequenceIndex::kBlocksPerGroup} * 2 * 2 * 2);
  EXPECT_FALSE((*index)->sealed(0));
}

TEST(RepresentationTest, ChannelTiesGoToTheLowerChannel) {
  const ModelShape shape = SmallShape();
  Knobs knobs;  // 2 of 8 channels
  std::vector<float> block(size_t{shape.block_size} * shape.num_kv_heads * shape.head_dim, 1.0f);
  const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(block.data()),
                                        block.size() * sizeof(float));
  auto index = SequenceIndex::Create(shape, knobs);
  ASSERT_TRUE(index.ok());
  ASSERT_TRUE((*index)->SealLayer(0, {bytes}).ok());
  EXPECT_THAT((*index)->kept_channels(0, 0), ElementsAre(0, 1));
  EXPECT_THAT((*index)->kept_channels(0, 1), ElementsAre(0, 1));
}

TEST(RepresentationTest, MatchesReferenceRepresentationBitForBit) {
  std::mt19937 rng(5);
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    ModelShape shape{1, 6, 3, 40, 12, dtype};
    Knobs knobs;
    knobs.blk_repre_inner_token_merge = 3;
    testing::KeyBlocks keys(shape, 21, rng);  // two groups, the second partial
    auto index = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(index.ok());
    ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
    const auto channels = ReferenceKeptChannels(shape, knobs, keys.spans);
    const auto rep = ReferenceRepresentation(shape, knobs, keys.spans, channels);
    const SequenceIndex& idx = **index;
    const uint32_t blocks = static_cast<uint32_t>(keys.spans.size());
    size_t at = 0;
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      const auto stored = idx.representation(0, h);
      std::vector<bool> visited(stored.size(), false);
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t m = 0; m < idx.vectors_per_block(); ++m) {
          for (uint32_t j = 0; j < idx.kept(); ++j) {
            const size_t offset = idx.representation_offset(b, m, j);
            ASSERT_LT(offset, stored.size());
            ASSERT_FALSE(visited[offset]);
            visited[offset] = true;
            ASSERT_EQ(Bf16ToF32(stored[offset]), rep[at++]);
          }
        }
      }
      // Padding (blocks past the last, the odd channel's partner) is zero.
      for (size_t i = 0; i < stored.size(); ++i) {
        if (!visited[i]) {
          ASSERT_EQ(stored[i], 0) << i;
        }
      }
      const size_t groups =
          (blocks + SequenceIndex::kBlocksPerGroup - 1) / SequenceIndex::kBlocksPerGroup;
      EXPECT_EQ(stored.size(), groups * idx.values_per_group());
      // Each group's norm is its largest vector norm (rounded up, so a bound on every q.v).
      const auto norms = idx.group_norms(0, h);
      ASSERT_EQ(norms.size(), groups);
      std::vector<double> largest(groups, 0.0);
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t m = 0; m < idx.vectors_per_block(); ++m) {
          double squares = 0.0;
          for (uint32_t j = 0; j < idx.kept(); ++j) {
            const double v = Bf16ToF32(stored[idx.representation_offset(b, m, j)]);
            squares += v * v;
          }
          largest[b / SequenceIndex::kBlocksPerGroup] =
              std::max(largest[b / SequenceIndex::kBlocksPerGroup], std::sqrt(squares));
        }
      }
      for (size_t g = 0; g < groups; ++g) {
        EXPECT_GE(norms[g], largest[g]);
        EXPECT_NEAR(norms[g], largest[g], 1e-6 * largest[g]);
      }
    }
    EXPECT_EQ(at, rep.size());
    // The row-major copy is the reference order.
    at = 0;
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      for (uint16_t v : idx.RowMajorRepresentation(0, h)) ASSERT_EQ(Bf16ToF32(v), rep[at++]);
    }
    EXPECT_EQ(at, rep.size());
    EXPECT_EQ(idx.representation_bytes(),
              shape.num_kv_heads * idx.representation(0, 0).size() * sizeof(uint16_t));
  }
}

// int8: every stored code and scale decodes to the reference's dequantized value, padding holds
// the code offset (value 0) and scale 0, norms bound the decoded vectors, and appending blocks
// after the seal stores the same bytes as sealing them at once.
TEST(RepresentationTest, Int8CodesAndScalesMatchTheReferenceQuantization) {
  std::mt19937 rng(9);
  for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    ModelShape shape{1, 6, 3, 40, 12, dtype};  // kept 10: three quads, the last one partial
    Knobs knobs;
    knobs.blk_repre_inner_token_merge = 3;
    knobs.representation_format = RepresentationFormat::kInt8;
    testing::KeyBlocks keys(shape, 21, rng);
    auto index = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(index.ok());
    ASSERT_TRUE((*index)->SealLayer(0, keys.spans).ok());
    const auto channels = ReferenceKeptChannels(shape, knobs, keys.spans);
    const auto rep = ReferenceRepresentation(shape, knobs, keys.spans, channels);
    const SequenceIndex& idx = **index;
    ASSERT_EQ(idx.kept(), 10u);
    const uint32_t blocks = static_cast<uint32_t>(keys.spans.size());
    const size_t groups =
        (blocks + SequenceIndex::kBlocksPerGroup - 1) / SequenceIndex::kBlocksPerGroup;
    size_t at = 0;
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      EXPECT_TRUE(idx.representation(0, h).empty());
      const auto codes = idx.codes(0, h);
      const auto scales = idx.code_scales(0, h);
      ASSERT_EQ(codes.size(), groups * idx.codes_per_group());
      ASSERT_EQ(scales.size(), groups * SequenceIndex::kBlocksPerGroup * idx.vectors_per_block());
      std::vector<bool> visited(codes.size(), false);
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t m = 0; m < idx.vectors_per_block(); ++m) {
          const float scale = scales[idx.scale_offset(b, m)];
          double squares = 0.0;
          for (uint32_t j = 0; j < idx.kept(); ++j) {
            const size_t offset = idx.code_offset(b, m, j);
            ASSERT_FALSE(visited[offset]);
            visited[offset] = true;
            const int code = int{codes[offset]} - int{kInt8CodeOffset};
            ASSERT_LE(std::abs(code), 127);
            ASSERT_EQ(static_cast<float>(code) * scale, rep[at++]);
            squares += double{rep[at - 1]} * rep[at - 1];
          }
          EXPECT_GE(idx.group_norms(0, h)[b / SequenceIndex::kBlocksPerGroup], std::sqrt(squares));
        }
      }
      for (size_t i = 0; i < codes.size(); ++i) {
        if (!visited[i]) {
          ASSERT_EQ(codes[i], kInt8CodeOffset) << i;
        }
      }
    }
    EXPECT_EQ(at, rep.size());
    EXPECT_EQ(idx.representation_bytes(),
              shape.num_kv_heads * (idx.codes(0, 0).size() + idx.code_scales(0, 0).size() * 4));

    auto appended = SequenceIndex::Create(shape, knobs);
    ASSERT_TRUE(appended.ok());
    ASSERT_TRUE(
        (*appended)
            ->SealLayerWithChannels(0, absl::MakeConstSpan(keys.spans).subspan(0, 5), channels)
            .ok());
    for (size_t b = 5; b < keys.spans.size(); ++b) {
      ASSERT_TRUE((*appended)->AppendBlock(0, keys.spans[b]).ok());
    }
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      EXPECT_TRUE(std::equal(idx.codes(0, h).begin(), idx.codes(0, h).end(),
                             (*appended)->codes(0, h).begin(), (*appended)->codes(0, h).end()));
      EXPECT_TRUE(std::equal(idx.code_scales(0, h).begin(), idx.code_scales(0, h).end(),
                             (*appended)->code_scales(0, h).begin(),
                             (*appended)->code_scales(0, h).end()));
    }
  }
}

// The VNNI kernel folds both query codes into one accumulator (256 * high dot + low dot, with the
// offset's share -128 * sum(high) - sum(low) / 2 as its start): the low codes' sum must be even,
// and every value within one low step of what the codes stand for.
TEST(RepresentationTest, QueryCodesHaveAnEvenLowSumAndStayWithinALowStep) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (size_t count : {1, 2, 3, 7, 32, 33, 128}) {
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> values(count);
      for (float& v : values) v = normal(rng) * (trial % 3 == 0 ? 100.0f : 1.0f);
      std::vector<int8_t> high(count), low(count);
      const float scale = QuantizeQueryInt8(values.data(), count, high.data(), low.data());
      int low_sum = 0;
      for (size_t i = 0; i < count; ++i) {
        low_sum += low[i];
        EXPECT_NEAR(QueryCodeValue(high[i], low[i]) * scale, values[i],
                    scale / kLowCodeSteps + 1e-6 * std::fabs(values[i]))
            << "count " << count << " channel " << i;
      }
      EXPECT_EQ(low_sum % 2, 0) << "count " << count;
    }
  }
  std::vector<int8_t> high(4), low(4);
  EXPECT_EQ(QuantizeQueryInt8(std::vector<float>(4, 0.0f).data(), 4, high.data(), low.data()),
            0.0f);
  EXPECT_THAT(low, ::testing::Each(0));
}

TEST(RepresentationTest, RejectsWrongBlockSizesAndAppendBeforeSeal) {
  const ModelShape shape = SmallShape();
  auto index = SequenceIndex::Create(shape, Knobs());
  ASSERT_TRUE(index.ok());
  std::vector<uint8_t> short_block(shape.key_block_bytes() - 1);
  EXPECT_EQ((*index)->SealLayer(0, {absl::MakeConstSpan(short_block)}).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> block(shape.key_block_bytes());
  EXPECT_EQ((*index)->AppendBlock(0, block).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*index)->SealLayer(3, {absl::MakeConstSpan(block)}).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<uint32_t> duplicate_channels = {1, 1, 2, 3};
  EXPECT_EQ(
      (*index)->SealLayerWithChannels(0, {absl::MakeConstSpan(block)}, duplicate_channels).code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvstar::retrieval
