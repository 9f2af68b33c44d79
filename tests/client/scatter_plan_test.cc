// PlanScatteredCopy on the CPU: every plan, executed with memcpy into a host "landing" buffer and
// out again, must leave destinations bit-identical to one memcpy per segment, and it must use the
// landing path exactly where the CUDA backend relies on it for speed.
#include "client/scatter_plan.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvstar::client_internal {
namespace {

// Runs `plan` with host memory standing in for the device: what the CUDA backend does, in order.
void Execute(const ScatterPlan& plan, size_t capacity) {
  std::vector<char> landing(capacity + 64, 0);
  for (const CopySegment& segment : plan.direct)
    std::memcpy(segment.dst, segment.src, segment.bytes);
  for (const ScatterRound& round : plan.rounds) {
    ASSERT_LE(round.landing_bytes, capacity);
    for (const LandingCopy& copy : round.copies) {
      ASSERT_LE(copy.landing_offset + copy.bytes, round.landing_bytes);
      std::memcpy(landing.data() + copy.landing_offset, copy.src, copy.bytes);
    }
    for (const ScatterPiece& piece : round.pieces) {
      ASSERT_LE(piece.landing_offset + piece.bytes, round.landing_bytes);
      std::memcpy(piece.dst, landing.data() + piece.landing_offset, piece.bytes);
    }
  }
}

struct Buffers {
  std::vector<char> source;
  std::vector<char> expected;
  std::vector<char> got;
};

Buffers MakeBuffers(size_t source_bytes, size_t destination_bytes, uint32_t seed) {
  Buffers buffers;
  std::mt19937 random(seed);
  buffers.source.resize(source_bytes);
  for (char& byte : buffers.source) byte = static_cast<char>(random());
  buffers.expected.assign(destination_bytes, 0);
  buffers.got.assign(destination_bytes, 0);
  return buffers;
}

// Segments against `destination`, and the same ones against `reference` applied with memcpy.
std::vector<CopySegment> Retarget(const std::vector<CopySegment>& segments, char* from, char* to) {
  std::vector<CopySegment> moved = segments;
  for (CopySegment& segment : moved) segment.dst = to + (static_cast<char*>(segment.dst) - from);
  return moved;
}

void ExpectPlanCopiesLikeMemcpy(const std::vector<CopySegment>& segments, Buffers& buffers,
                                const ScatterPlanOptions& options) {
  for (const CopySegment& segment : segments) std::memcpy(segment.dst, segment.src, segment.bytes);
  const std::vector<CopySegment> retargeted =
      Retarget(segments, buffers.expected.data(), buffers.got.data());
  const ScatterPlan plan = PlanScatteredCopy(retargeted, options);
  Execute(plan, options.landing_capacity_bytes);
  size_t total = 0;
  for (const CopySegment& segment : segments) total += segment.bytes;
  EXPECT_EQ(plan.scattered_bytes() + plan.direct_bytes(), total);
  EXPECT_LE(plan.landing_bytes, options.landing_capacity_bytes);
  EXPECT_TRUE(buffers.got == buffers.expected) << "destinations differ from memcpy";
}

TEST(ScatterPlanTest, SmallBlocksFromOneStagingBufferBecomeOneBulkCopyAndOneScatter) {
  constexpr size_t kBlock = 64 << 10;
  constexpr size_t kCount = 100;
  Buffers buffers = MakeBuffers(kCount * kBlock, 2 * kCount * kBlock, 1);
  std::vector<CopySegment> segments;
  for (size_t i = 0; i < kCount; ++i) {
    // Every other slot, descending: nothing coalesces on the destination side.
    const size_t slot = 2 * (kCount - 1 - i);
    segments.push_back(
        {buffers.expected.data() + slot * kBlock, buffers.source.data() + i * kBlock, kBlock});
  }
  ScatterPlanOptions options;
  options.landing_capacity_bytes = 16 << 20;
  const ScatterPlan plan =
      PlanScatteredCopy(Retarget(segments, buffers.expected.data(), buffers.got.data()), options);
  EXPECT_TRUE(plan.direct.empty());
  ASSERT_EQ(plan.rounds.size(), 1u);
  ASSERT_EQ(plan.rounds[0].copies.size(), 1u);
  EXPECT_EQ(plan.rounds[0].copies[0].bytes, kCount * kBlock);
  EXPECT_EQ(plan.rounds[0].pieces.size(), kCount);
  EXPECT_EQ(plan.landing_bytes,
            kCount * kBlock + reinterpret_cast<uintptr_t>(buffers.source.data()) % 16);
  ExpectPlanCopiesLikeMemcpy(segments, buffers, options);
}

TEST(ScatterPlanTest, LoadsLargerThanTheLandingBufferTakeSeveralRounds) {
  constexpr size_t kBlock = 64 << 10;
  constexpr size_t kCount = 40;
  Buffers buffers = MakeBuffers(kCount * kBlock, 2 * kCount * kBlock, 2);
  std::vector<CopySegment> segments;
  for (size_t i = 0; i < kCount; ++i) {
    segments.push_back({buffers.expected.data() + ((i * 7) % (2 * kCount)) * kBlock,
                        buffers.source.data() + i * kBlock, kBlock});
  }
  ScatterPlanOptions options;
  options.landing_capacity_bytes = 10 * kBlock + 4096;  // blocks split across rounds
  const ScatterPlan plan =
      PlanScatteredCopy(Retarget(segments, buffers.expected.data(), buffers.got.data()), options);
  EXPECT_TRUE(plan.direct.empty());
  EXPECT_EQ(plan.rounds.size(), (kCount * kBlock + options.landing_capacity_bytes - 1) /
                                    options.landing_capacity_bytes);
  for (const ScatterRound& round : plan.rounds) EXPECT_EQ(round.copies.size(), 1u);
  ExpectPlanCopiesLikeMemcpy(segments, buffers, options);
}

TEST(ScatterPlanTest, LargeRunsAndLoneSegmentsGoDirect) {
  constexpr size_t kMiB = 1 << 20;
  Buffers buffers = MakeBuffers(8 * kMiB, 16 * kMiB, 3);
  char* dst = buffers.expected.data();
  const char* src = buffers.source.data();
  std::vector<CopySegment> segments = {
      {dst + 8 * kMiB, src, kMiB},                 // large: direct
      {dst, src + kMiB, 64 << 10},                 // lone small (next source jumps)
      {dst + 4 * kMiB, src + 3 * kMiB, 64 << 10},  // span of two small ones
      {dst + 2 * kMiB, src + 3 * kMiB + (64 << 10), 64 << 10},
      // Two 512 KiB halves that coalesce on both sides into one 1 MiB run: direct.
      {dst + 12 * kMiB, src + 5 * kMiB, kMiB / 2},
      {dst + 12 * kMiB + kMiB / 2, src + 5 * kMiB + kMiB / 2, kMiB / 2},
      {dst + 15 * kMiB, src + 7 * kMiB, 0},  // empty: dropped
  };
  ScatterPlanOptions options;
  const ScatterPlan plan =
      PlanScatteredCopy(Retarget(segments, buffers.expected.data(), buffers.got.data()), options);
  ASSERT_EQ(plan.direct.size(), 3u);
  EXPECT_EQ(plan.direct[0].bytes, kMiB);
  EXPECT_EQ(plan.direct[1].bytes, size_t{64} << 10);
  EXPECT_EQ(plan.direct[2].bytes, kMiB);
  ASSERT_EQ(plan.rounds.size(), 1u);
  EXPECT_EQ(plan.rounds[0].pieces.size(), 2u);
  ExpectPlanCopiesLikeMemcpy(segments, buffers, options);
}

TEST(ScatterPlanTest, ForcedPathsCoverEverything) {
  constexpr size_t kBlock = 256 << 10;
  Buffers buffers = MakeBuffers(8 * kBlock, 16 * kBlock, 4);
  std::vector<CopySegment> segments;
  for (size_t i = 0; i < 8; ++i) {
    segments.push_back({buffers.expected.data() + (15 - 2 * i) * kBlock,
                        buffers.source.data() + i * kBlock, kBlock});
  }
  ScatterPlanOptions all_direct;
  all_direct.direct_min_bytes = 0;
  const ScatterPlan direct = PlanScatteredCopy(segments, all_direct);
  EXPECT_EQ(direct.direct.size(), 8u);
  EXPECT_TRUE(direct.rounds.empty());
  ScatterPlanOptions all_landed;
  all_landed.direct_min_bytes = SIZE_MAX;
  const ScatterPlan landed = PlanScatteredCopy(segments, all_landed);
  EXPECT_TRUE(landed.direct.empty());
  EXPECT_EQ(landed.scattered_bytes(), 8 * kBlock);
  ExpectPlanCopiesLikeMemcpy(segments, buffers, all_landed);
}

TEST(ScatterPlanTest, AlignedSourcesLandAlignedEvenWhenSplit) {
  constexpr size_t kBlock = 48 << 10;
  alignas(64) static char source[20 * kBlock];
  alignas(64) static char destination[40 * kBlock];
  std::vector<CopySegment> segments;
  for (size_t i = 0; i < 20; ++i) {
    segments.push_back({destination + ((i * 13) % 40) * kBlock, source + i * kBlock, kBlock});
  }
  ScatterPlanOptions options;
  options.landing_capacity_bytes = 5 * kBlock + 1000;  // not a multiple of 16: rounded down
  const ScatterPlan plan = PlanScatteredCopy(segments, options);
  ASSERT_GT(plan.rounds.size(), 1u);
  for (const ScatterRound& round : plan.rounds) {
    EXPECT_EQ(round.landing_bytes % 16 == 0 || &round == &plan.rounds.back(), true);
    for (const ScatterPiece& piece : round.pieces) {
      EXPECT_EQ(piece.landing_offset % 16, 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(piece.dst) % 16, 0u);
    }
  }
}

TEST(ScatterPlanTest, RandomBatchesOfAwkwardSizesMatchMemcpy) {
  std::mt19937 random(5);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t count = random() % 40;
    std::vector<size_t> sizes(count);
    size_t total = 0;
    for (size_t& size : sizes) {
      // Mostly small and odd; sometimes empty; sometimes past the direct threshold.
      const uint32_t kind = random() % 10;
      size = kind == 0 ? 0 : kind == 1 ? (1 << 20) + random() % 5000 : 1 + random() % 70000;
      total += size;
    }
    Buffers buffers = MakeBuffers(total + 1, 2 * total + 64, trial);
    // Destinations: disjoint, shuffled; sources: contiguous with occasional gaps.
    std::vector<size_t> order(count);
    for (size_t i = 0; i < count; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), random);
    std::vector<size_t> dst_offset(count);
    size_t cursor = random() % 16;
    for (size_t i : order) {
      dst_offset[i] = cursor;
      cursor += sizes[i] + (random() % 3 == 0 ? random() % 32 : 0);
    }
    ASSERT_LE(cursor, buffers.expected.size());
    std::vector<CopySegment> segments;
    size_t src_offset = 0;
    for (size_t i = 0; i < count; ++i) {
      if (src_offset + sizes[i] > buffers.source.size()) break;
      segments.push_back(
          {buffers.expected.data() + dst_offset[i], buffers.source.data() + src_offset, sizes[i]});
      src_offset += sizes[i];
      if (random() % 8 == 0 && src_offset > 0) src_offset -= 1;  // a gap backwards: new span
    }
    ScatterPlanOptions options;
    options.landing_capacity_bytes = 64 + random() % (256 << 10);
    options.direct_min_bytes = random() % 2 == 0 ? (1 << 20) : 1 + random() % 100000;
    ExpectPlanCopiesLikeMemcpy(segments, buffers, options);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace kvstar::client_internal
