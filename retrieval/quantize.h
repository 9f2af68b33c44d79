// Symmetric 8-bit quantization shared by the index, the scorer and the scalar reference, so the
// three agree on every code and scale.
#ifndef KVSTAR_RETRIEVAL_QUANTIZE_H_
#define KVSTAR_RETRIEVAL_QUANTIZE_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace kvstar::retrieval {

// Rounds half away from zero, inline (std::nearbyint is a libm call without SSE4.1, and sealing
// quantizes every vector). NaN and values beyond int32 (only from non-finite keys) give 0.
inline float RoundToCode(float x) {
  if (!(std::fabs(x) < 2147483520.0f)) return 0.0f;
  return static_cast<float>(static_cast<int32_t>(x + (x >= 0.0f ? 0.5f : -0.5f)));
}

// Codes of `values` as round(value / scale) in [-127, 127] with scale = max |value| / 127, so
// value ~= code * scale within scale / 2. Returns the scale (0 when every value is 0; the codes
// are then 0).
inline float QuantizeSymmetricInt8(const float* values, size_t count, int8_t* codes) {
  float max_abs = 0.0f;
  for (size_t i = 0; i < count; ++i) {
    const float magnitude = std::fabs(values[i]);
    max_abs = magnitude > max_abs ? magnitude : max_abs;
  }
  if (!(max_abs > 0.0f)) {
    for (size_t i = 0; i < count; ++i) codes[i] = 0;
    return 0.0f;
  }
  const float scale = max_abs / 127.0f;
  const float inverse = 127.0f / max_abs;
  for (size_t i = 0; i < count; ++i) {
    const float code = RoundToCode(values[i] * inverse);
    codes[i] = static_cast<int8_t>(code < -127.0f ? -127.0f : (code > 127.0f ? 127.0f : code));
  }
  return scale;
}

// Queries need finer steps than keys (a single int8 code per channel moved block ranks on real
// traces; so did a 9-bit code, and 10 bits: trace_test's layer 10 needs about 11): a row is
// quantized as two int8 codes per value, value ~= (high + low / kLowCodeSteps) * scale within
// scale / (2 * kLowCodeSteps) (one channel may be off by up to one low step, below), high as
// QuantizeSymmetricInt8 and low the rounded remainder. kLowCodeSteps is 256 so that
// 256 * high_dot + low_dot is one integer dot (the VNNI kernel shifts its accumulator by 8 bits
// between the two codes instead of keeping a second one), and the low codes' sum is made even so
// that the unsigned offset's share of both codes, -128 * (sum high) - (sum low) / 2, is an integer
// too. Returns the scale.
inline constexpr float kLowCodeSteps = 256.0f;

inline float QuantizeQueryInt8(const float* values, size_t count, int8_t* high, int8_t* low) {
  const float scale = QuantizeSymmetricInt8(values, count, high);
  auto remainder = [&](size_t i) {
    return (values[i] / scale - static_cast<float>(high[i])) * kLowCodeSteps;
  };
  int low_sum = 0;
  for (size_t i = 0; i < count; ++i) {
    if (scale == 0.0f) {
      low[i] = 0;
      continue;
    }
    const float code = RoundToCode(remainder(i));
    low[i] = static_cast<int8_t>(code < -127.0f ? -127.0f : (code > 127.0f ? 127.0f : code));
    low_sum += low[i];
  }
  if (low_sum % 2 == 0) return scale;
  // An odd sum (so scale > 0): move the code that rounded farthest one step toward its value,
  // which leaves it within one low step; if every such move leaves the code range (all codes at
  // +-127 rounding outwards), move one inwards instead.
  size_t widest = 0;
  float widest_residual = -1.0f;
  for (size_t i = 0; i < count; ++i) {
    const float residual = remainder(i) - static_cast<float>(low[i]);
    const int toward = residual >= 0.0f ? 1 : -1;
    if (low[i] + toward > 127 || low[i] + toward < -127) continue;
    if (std::fabs(residual) > widest_residual) {
      widest_residual = std::fabs(residual);
      widest = i;
    }
  }
  int step = remainder(widest) >= static_cast<float>(low[widest]) ? 1 : -1;
  if (low[widest] + step > 127 || low[widest] + step < -127) step = -step;
  low[widest] = static_cast<int8_t>(low[widest] + step);
  return scale;
}

// The value QuantizeQueryInt8 codes stand for, in units of the scale.
inline double QueryCodeValue(int8_t high, int8_t low) {
  return static_cast<double>(high) + static_cast<double>(low) / kLowCodeSteps;
}

// Stored int8 codes are offset by 128 (so they read as unsigned bytes: the VNNI dot product takes
// one unsigned operand); the zero of an unused slot is stored as this.
inline constexpr uint8_t kInt8CodeOffset = 128;

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_QUANTIZE_H_
