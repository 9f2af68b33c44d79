// Random K blocks and queries in any dtype, for the retrieval tests.
#ifndef KVSTAR_TESTS_RETRIEVAL_TEST_UTIL_H_
#define KVSTAR_TESTS_RETRIEVAL_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "absl/types/span.h"
#include "retrieval/convert.h"
#include "retrieval/model_shape.h"

namespace kvstar::retrieval::testing {

// Stores `value` as element `index` of a dtype array.
inline void StoreAs(DType dtype, uint8_t* dst, size_t index, float value) {
  uint16_t half;
  switch (dtype) {
    case DType::kBf16:
      half = F32ToBf16(value);
      std::memcpy(dst + 2 * index, &half, 2);
      return;
    case DType::kFp16:
      half = F32ToF16(value);
      std::memcpy(dst + 2 * index, &half, 2);
      return;
    case DType::kFp32:
      std::memcpy(dst + 4 * index, &value, 4);
      return;
  }
}

inline std::vector<uint8_t> RandomElements(DType dtype, size_t count, std::mt19937& rng,
                                           float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<uint8_t> bytes(count * DTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) StoreAs(dtype, bytes.data(), i, normal(rng));
  return bytes;
}

// num_blocks random K blocks of one layer.
struct KeyBlocks {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<absl::Span<const uint8_t>> spans;

  KeyBlocks(const ModelShape& shape, uint32_t num_blocks, std::mt19937& rng) {
    const size_t elems = size_t{shape.block_size} * shape.num_kv_heads * shape.head_dim;
    for (uint32_t b = 0; b < num_blocks; ++b)
      bytes.push_back(RandomElements(shape.dtype, elems, rng));
    Refresh();
  }
  void Refresh() { spans.assign(bytes.begin(), bytes.end()); }
};

}  // namespace kvstar::retrieval::testing

#endif  // KVSTAR_TESTS_RETRIEVAL_TEST_UTIL_H_
