// The blocks the crash test's writer puts and its checker expects: every write of round R to
// crash sequence S replaces all kCrashBlockIds of S with bytes that depend only on (S, R, block),
// and the first 8 bytes of each K say R, so a reader can tell which write a block came from.
#ifndef KVSTAR_TESTS_STORAGE_CRASH_BLOCKS_H_
#define KVSTAR_TESTS_STORAGE_CRASH_BLOCKS_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "storage/block_store.h"

namespace kvstar::storage {

inline constexpr uint32_t kCrashSequences = 3;
inline constexpr size_t kCrashHalfBytes = 8 << 10;
// Two layers, so a directory-store batch is two segment files (a crash can fall between them).
inline const std::vector<BlockId>& CrashBlockIds() {
  static const std::vector<BlockId> ids = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};
  return ids;
}

inline std::string CrashSequenceKey(uint32_t sequence) { return absl::StrCat("crash-", sequence); }

struct CrashBlock {
  BlockId id;
  std::string key;
  std::string value;
};

inline CrashBlock MakeCrashBlock(uint32_t sequence, uint64_t round, BlockId id) {
  CrashBlock block{id, std::string(kCrashHalfBytes, '\0'), std::string(kCrashHalfBytes, '\0')};
  uint64_t state = (round * 0x9E3779B97F4A7C15ull) ^ (uint64_t{sequence} << 48) ^
                   (uint64_t{id.layer} << 32) ^ id.block_index;
  for (std::string* half : {&block.key, &block.value}) {
    for (size_t i = 0; i < half->size(); i += 8) {
      uint64_t z = (state += 0x9E3779B97F4A7C15ull);  // splitmix64
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      std::memcpy(half->data() + i, &z, 8);
    }
  }
  std::memcpy(block.key.data(), &round, sizeof(round));
  return block;
}

inline uint64_t CrashRoundOf(const std::string& key) {
  uint64_t round = 0;
  if (key.size() >= sizeof(round)) std::memcpy(&round, key.data(), sizeof(round));
  return round;
}

}  // namespace kvstar::storage

#endif  // KVSTAR_TESTS_STORAGE_CRASH_BLOCKS_H_
