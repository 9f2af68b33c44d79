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

// A block of `key_bytes` K and as many V bytes, with a correct checksum.
inline v1::Block MakeBlock(uint64_t seed, uint32_t layer, uint32_t block_index,
                           uint64_t key_bytes) {
  v1::Block block;
  block.set_layer(layer);
  block.set_block_index(block_index);
  const uint64_t base = (seed << 40) ^ (uint64_t{layer} << 20) ^ block_index;
  block.mutable_key()->resize(key_bytes);
  block.mutable_value()->resize(key_bytes);
  FillPseudoRandom(base * 2, block.mutable_key());
  FillPseudoRandom(base * 2 + 1, block.mutable_value());
  block.set_checksum(storage::BlockChecksum(block.key(), block.value()));
  return block;
}

}  // namespace kvstar::testing

#endif  // KVSTAR_TESTS_INTEGRATION_BLOCK_FIXTURES_H_
