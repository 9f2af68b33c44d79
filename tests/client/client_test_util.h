// Shared shapes and helpers of the client tests: a small model (4 layers, 2 KV heads of dim 64,
// fp16, 128-token blocks: 32 KiB of K per block) so a 4K-token sequence is 128 blocks, and checks
// that a slot holds the bytes of the block the table says.
#ifndef KVSTAR_TESTS_CLIENT_CLIENT_TEST_UTIL_H_
#define KVSTAR_TESTS_CLIENT_CLIENT_TEST_UTIL_H_

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kvstar/client.h"
#include "tests/integration/block_fixtures.h"

namespace kvstar::testing {

constexpr uint32_t kLayers = 4;
constexpr uint32_t kTokens = 4096;
constexpr uint32_t kBlockSize = 128;
constexpr uint32_t kPromptBlocks = kTokens / kBlockSize;
constexpr uint64_t kSeed = 11;

// Init block 0, local window n-2 and n-1, and four middle blocks that move by one every
// kStride steps (a FakeKvStore selector).
template <uint32_t kStride>
std::vector<uint32_t> ShiftingSelection(uint32_t, uint32_t num_blocks, uint64_t step) {
  const uint32_t shift = static_cast<uint32_t>(step / kStride);
  std::vector<uint32_t> blocks = {0};
  for (uint32_t i = 1 + shift; i < 5 + shift && i < num_blocks - 2; ++i) blocks.push_back(i);
  blocks.push_back(num_blocks - 2);
  blocks.push_back(num_blocks - 1);
  return blocks;
}

// Polls `predicate` every 5 ms for up to 10 s.
template <typename Predicate>
bool WaitFor(Predicate predicate) {
  for (int i = 0; i < 2000; ++i) {
    if (predicate()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

inline ModelProfile SmallProfile() {
  ModelProfile profile;
  profile.num_layers = kLayers;
  profile.num_q_heads = 4;
  profile.num_kv_heads = 2;
  profile.head_dim = 64;
  profile.block_size = kBlockSize;
  profile.dtype = DType::kFp16;
  return profile;
}

inline KvstarConfig SmallConfig(uint32_t stride = 4) {
  KvstarConfig config;
  config.retrieval_stride = stride;
  return config;
}

// Keeps fp16 values finite and below 2: clears the top exponent bits of every 16-bit element, so
// scores computed from these bytes are numbers, not NaN.
inline void TameFp16(std::string* bytes) {
  for (size_t i = 1; i < bytes->size(); i += 2) (*bytes)[i] &= 0x3b;
}

// Block (layer, index) of the test sequence: deterministic, finite fp16, correct checksum.
inline v1::Block TestBlock(uint64_t seed, uint32_t layer, uint32_t index, uint64_t key_bytes) {
  v1::Block block = MakeBlock(seed, layer, index, key_bytes);
  TameFp16(block.mutable_key());
  TameFp16(block.mutable_value());
  block.set_checksum(storage::BlockChecksum(block.key(), block.value()));
  return block;
}

// Offloads blocks [first, first + count) of every layer from host memory.
inline absl::Status OffloadBlocks(Sequence* sequence, uint32_t first, uint32_t count,
                                  uint64_t seed = kSeed) {
  const uint64_t key_bytes = sequence->profile().block_key_bytes();
  for (uint32_t layer = 0; layer < sequence->profile().num_layers; ++layer) {
    for (uint32_t index = first; index < first + count; ++index) {
      const v1::Block block = TestBlock(seed, layer, index, key_bytes);
      absl::Status status = sequence->Offload(layer, index, block.key().data(),
                                              block.value().data(), MemoryKind::kHost, nullptr);
      if (!status.ok()) return status;
    }
  }
  return absl::OkStatus();
}

// Deterministic queries for `rows` tokens of every layer.
inline std::string MakeQueries(const ModelProfile& profile, uint32_t rows, uint64_t seed) {
  std::string queries(uint64_t{profile.num_layers} * rows * profile.query_bytes(), '\0');
  FillPseudoRandom(seed, &queries);
  TameFp16(&queries);
  return queries;
}

// Slots in host-addressable memory (host backend): every table entry holds its block's K and V
// (slot s at slot_pool + s * slot_bytes: slot ids index the whole pool).
inline void ExpectTableHoldsBlocks(const SlotTable& table, uint64_t key_bytes,
                                   uint64_t seed = kSeed) {
  for (uint32_t i = 0; i < table.count; ++i) {
    const char* slot = static_cast<const char*>(table.slot_pool) +
                       uint64_t(table.host_slots[i]) * table.slot_bytes;
    ASSERT_EQ(table.device_slots[i], table.host_slots[i]);
    const v1::Block expected = TestBlock(seed, table.layer, table.block_indices[i], key_bytes);
    ASSERT_EQ(std::memcmp(slot, expected.key().data(), key_bytes), 0)
        << "K of layer " << table.layer << " block " << table.block_indices[i];
    ASSERT_EQ(std::memcmp(slot + key_bytes, expected.value().data(), key_bytes), 0)
        << "V of layer " << table.layer << " block " << table.block_indices[i];
  }
}

inline std::vector<uint32_t> Blocks(const SlotTable& table) {
  return std::vector<uint32_t>(table.block_indices, table.block_indices + table.count);
}

}  // namespace kvstar::testing

#endif  // KVSTAR_TESTS_CLIENT_CLIENT_TEST_UTIL_H_
