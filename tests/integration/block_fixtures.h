// Deterministic KV blocks for tests and benchmarks: the bytes of block (layer, index) of a
// sequence depend only on (seed, layer, index), so a reader can regenerate and compare them
// without keeping hundreds of MiB in memory.
#ifndef KVSTAR_TESTS_INTEGRATION_BLOCK_FIXTURES_H_
#define KVSTAR_TESTS_INTEGRATION_BLOCK_FIXTURES_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "kvstar/v1/kvstar.pb.h"
#include "storage/block_store.h"

namespace kvstar::testing {

inline void FillPseudoRandom(uint64_t seed, std::string* bytes) {
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < bytes->size(); i += 8) {
    // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(bytes->data() + i, &z, std::min<size_t>(8, bytes->size() - i));
  }
}

// bf16 values of an (approximately) standard normal distribution — real numbers, unlike random
// bytes, which hold NaNs and infinities: what a model's K and V look like to the retrieval
// engine. Each value is the Irwin-Hall sum of four 16-bit uniforms, which is cheap and close
// enough to normal for tests and demos.
inline void FillBf16Normal(uint64_t seed, std::string* bytes) {
  std::string raw(bytes->size() / 2 * 8, '\0');
  FillPseudoRandom(seed, &raw);
  for (size_t i = 0; i + 1 < bytes->size(); i += 2) {
    uint64_t z;
    std::memcpy(&z, &raw[i / 2 * 8], 8);
    const uint32_t sum = (z & 0xffff) + ((z >> 16) & 0xffff) + ((z >> 32) & 0xffff) + (z >> 48);
    const float value = (sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;  // mean 0, variance 1
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const uint16_t bf16 = static_cast<uint16_t>(bits >> 16);
    std::memcpy(&(*bytes)[i], &bf16, 2);
  }
}

// A block of `key_bytes` K and as many V bytes, filled by `fill(seed, bytes)`, with a correct
// checksum.
template <typename Fill>
v1::Block MakeBlockWith(Fill fill, uint64_t seed, uint32_t layer, uint32_t block_index,
                        uint64_t key_bytes) {
  v1::Block block;
  block.set_layer(layer);
  block.set_block_index(block_index);
  const uint64_t base = (seed << 40) ^ (uint64_t{layer} << 20) ^ block_index;
  block.mutable_key()->resize(key_bytes);
  block.mutable_value()->resize(key_bytes);
  fill(base * 2, block.mutable_key());
  fill(base * 2 + 1, block.mutable_value());
  block.set_checksum(storage::BlockChecksum(block.key(), block.value()));
  return block;
}

// Random bytes: what storage tests want (every bit pattern).
inline v1::Block MakeBlock(uint64_t seed, uint32_t layer, uint32_t block_index,
                           uint64_t key_bytes) {
  return MakeBlockWith(FillPseudoRandom, seed, layer, block_index, key_bytes);
}

// bf16 normal K and V: what retrieval wants (real numbers).
inline v1::Block MakeBf16Block(uint64_t seed, uint32_t layer, uint32_t block_index,
                               uint64_t key_bytes) {
  return MakeBlockWith(FillBf16Normal, seed, layer, block_index, key_bytes);
}

}  // namespace kvstar::testing

#endif  // KVSTAR_TESTS_INTEGRATION_BLOCK_FIXTURES_H_
