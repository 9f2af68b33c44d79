#include "retrieval/convert.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "hwy/targets.h"

namespace kvstar::retrieval {
namespace {

TEST(ConvertTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(F32ToBf16(-2.5f), 0xc020);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
  EXPECT_EQ(Bf16ToF32(F32ToBf16(INFINITY)), INFINITY);
}

TEST(ConvertTest, Fp16RoundTripsEveryHalf) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t half = static_cast<uint16_t>(bits);
    const float f = F16ToF32(half);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(f))));
      continue;
    }
    ASSERT_EQ(F32ToF16(f), half) << bits;
  }
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);  // rounds up to infinity
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
}

TEST(ConvertTest, SimdWideningMatchesScalarForAwkwardLengths) {
  std::mt19937 rng(9);
  std::uniform_int_distribution<uint32_t> bits16(0, 0xffff);
  for (size_t count : {0u, 1u, 3u, 7u, 8u, 15u, 16u, 17u, 33u, 100u}) {
    std::vector<uint16_t> halves(count);
    for (uint16_t& h : halves) h = static_cast<uint16_t>(bits16(rng));
    for (DType dtype : {DType::kBf16, DType::kFp16}) {
      std::vector<float> out(count + 1, -7.0f);
      ConvertToF32(dtype, halves.data(), count, out.data());
      for (size_t i = 0; i < count; ++i) {
        const float want = dtype == DType::kBf16 ? Bf16ToF32(halves[i]) : F16ToF32(halves[i]);
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(out[i]));
        } else {
          EXPECT_EQ(out[i], want) << DTypeName(dtype) << " " << i;
        }
      }
      EXPECT_EQ(out[count], -7.0f);  // nothing written past the end
    }
  }
}

// The SIMD |x| accumulation against a scalar loop, on awkward sizes, for every dtype and target.
TEST(ConvertTest, AddAbsMatchesScalarLoopForEveryTarget) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (DType dtype : {DType::kBf16, DType::kFp16, DType::kFp32}) {
      for (size_t count : {0, 1, 7, 16, 33, 1000}) {
        SCOPED_TRACE(testing::Message()
                     << hwy::TargetName(target) << " " << DTypeName(dtype) << " " << count);
        std::vector<uint8_t> bytes(count * DTypeSize(dtype));
        std::vector<float> sums(count), want(count);
        for (size_t i = 0; i < count; ++i) {
          const float v = normal(rng);
          if (dtype == DType::kBf16) {
            const uint16_t b = F32ToBf16(v);
            std::memcpy(&bytes[2 * i], &b, 2);
          } else if (dtype == DType::kFp16) {
            const uint16_t h = F32ToF16(v);
            std::memcpy(&bytes[2 * i], &h, 2);
          } else {
            std::memcpy(&bytes[4 * i], &v, 4);
          }
          sums[i] = want[i] = normal(rng);
        }
        for (int pass = 0; pass < 2; ++pass) {
          AddAbsF32(dtype, bytes.data(), count, sums.data());
          for (size_t i = 0; i < count; ++i)
            want[i] += std::fabs(LoadAsF32(dtype, bytes.data(), i));
        }
        EXPECT_EQ(sums, want);
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

}  // namespace
}  // namespace kvstar::retrieval
