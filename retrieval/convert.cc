#include "retrieval/convert.h"

#include <cmath>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "retrieval/convert.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace kvstar::retrieval {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <typename T>
void WidenToF32(const T* HWY_RESTRICT src, size_t count, float* HWY_RESTRICT dst) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<T, decltype(df)> dh;
  const size_t lanes = hn::Lanes(df);
  size_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, src + i)), df, dst + i);
  }
  if (i < count) {  // tail: a partial vector through a stack buffer
    HWY_ALIGN T in[hn::MaxLanes(df)] = {};
    HWY_ALIGN float out[hn::MaxLanes(df)];
    std::memcpy(in, src + i, (count - i) * sizeof(T));
    hn::Store(hn::PromoteTo(df, hn::Load(dh, in)), df, out);
    std::memcpy(dst + i, out, (count - i) * sizeof(float));
  }
}

template <typename T>
void AddAbs(const T* HWY_RESTRICT src, size_t count, float* HWY_RESTRICT sums) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<T, decltype(df)> dh;
  const size_t lanes = hn::Lanes(df);
  size_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    const auto value = hn::PromoteTo(df, hn::LoadU(dh, src + i));
    hn::StoreU(hn::Add(hn::LoadU(df, sums + i), hn::Abs(value)), df, sums + i);
  }
  for (; i < count; ++i) {
    float value;
    WidenToF32(src + i, 1, &value);
    sums[i] += std::fabs(value);
  }
}

void AddAbsImpl(DType dtype, const void* src, size_t count, float* sums) {
  switch (dtype) {
    case DType::kBf16:
      AddAbs(static_cast<const hwy::bfloat16_t*>(src), count, sums);
      return;
    case DType::kFp16:
      AddAbs(static_cast<const hwy::float16_t*>(src), count, sums);
      return;
    case DType::kFp32: {
      const hn::ScalableTag<float> df;
      const float* values = static_cast<const float*>(src);
      const size_t lanes = hn::Lanes(df);
      size_t i = 0;
      for (; i + lanes <= count; i += lanes) {
        hn::StoreU(hn::Add(hn::LoadU(df, sums + i), hn::Abs(hn::LoadU(df, values + i))), df,
                   sums + i);
      }
      for (; i < count; ++i) sums[i] += std::fabs(values[i]);
      return;
    }
  }
}

void ConvertToF32Impl(DType dtype, const void* src, size_t count, float* dst) {
  switch (dtype) {
    case DType::kBf16:
      WidenToF32(static_cast<const hwy::bfloat16_t*>(src), count, dst);
      return;
    case DType::kFp16:
      WidenToF32(static_cast<const hwy::float16_t*>(src), count, dst);
      return;
    case DType::kFp32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace kvstar::retrieval
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvstar::retrieval {

HWY_EXPORT(ConvertToF32Impl);
HWY_EXPORT(AddAbsImpl);

void AddAbsF32(DType dtype, const void* src, size_t count, float* sums) {
  HWY_DYNAMIC_DISPATCH(AddAbsImpl)(dtype, src, count, sums);
}

void ConvertToF32(DType dtype, const void* src, size_t count, float* dst) {
  HWY_DYNAMIC_DISPATCH(ConvertToF32Impl)(dtype, src, count, dst);
}

float F16ToF32(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits >> 15) << 31;
  const uint32_t exponent = (bits >> 10) & 0x1f;
  const uint32_t mantissa = bits & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal or zero
  } else if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  uint32_t out;
  std::memcpy(&out, &magnitude, sizeof(out));
  out |= sign;
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00;   // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00;  // rounds to >= 65520: infinity
  if (abs_bits < 0x38800000u) {                       // below 2^-14: subnormal half
    float abs_f;
    std::memcpy(&abs_f, &abs_bits, sizeof(abs_f));
    // Scaling by 2^24 makes the half's subnormal step 1.0; nearbyint rounds to nearest even.
    return sign | static_cast<uint16_t>(std::nearbyint(abs_f * 16777216.0f));
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t rebased = abs_bits - (uint32_t{127 - 15} << 23);
  rebased += 0xfffu + ((rebased >> 13) & 1u);
  return sign | static_cast<uint16_t>(rebased >> 13);
}

}  // namespace kvstar::retrieval
#endif  // HWY_ONCE
