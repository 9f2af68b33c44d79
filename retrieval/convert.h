// bf16 / fp16 <-> fp32 conversion: exact scalar helpers and a SIMD bulk widening.
#ifndef KVSTAR_RETRIEVAL_CONVERT_H_
#define KVSTAR_RETRIEVAL_CONVERT_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "retrieval/model_shape.h"

namespace kvstar::retrieval {

inline float Bf16ToF32(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE binary16 -> binary32, exact (subnormals, infinities and NaN included).
float F16ToF32(uint16_t bits);
// binary32 -> binary16, round to nearest even, overflow to infinity.
uint16_t F32ToF16(float f);

// Widens `count` elements of `dtype` at `src` (any alignment) to fp32 at `dst`, with SIMD
// (dynamic dispatch). Exact for every dtype.
void ConvertToF32(DType dtype, const void* src, size_t count, float* dst);

// sums[i] += |element i| for `count` elements of `dtype` at `src` (any alignment), with SIMD
// (dynamic dispatch); each sum adds in the same order as a scalar loop would.
void AddAbsF32(DType dtype, const void* src, size_t count, float* sums);

// Scalar load of element `index` of a `dtype` array.
inline float LoadAsF32(DType dtype, const uint8_t* src, size_t index) {
  uint16_t half;
  switch (dtype) {
    case DType::kBf16:
      std::memcpy(&half, src + 2 * index, 2);
      return Bf16ToF32(half);
    case DType::kFp16:
      std::memcpy(&half, src + 2 * index, 2);
      return F16ToF32(half);
    case DType::kFp32:
      break;
  }
  float f;
  std::memcpy(&f, src + 4 * index, 4);
  return f;
}

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_CONVERT_H_
