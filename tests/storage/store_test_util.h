// Helpers shared by the storage tests: temporary directories, random blocks the test owns, byte
// flips in real files, and a capture of spdlog's default logger.
#ifndef KVSTAR_TESTS_STORAGE_STORE_TEST_UTIL_H_
#define KVSTAR_TESTS_STORAGE_STORE_TEST_UTIL_H_

#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "spdlog/sinks/ostream_sink.h"
#include "spdlog/spdlog.h"
#include "storage/block_store.h"

namespace kvstar::storage {

// One layer's K (or V) of a 128-token block with 4 KV heads of dim 128 in bf16: 128 KiB.
inline constexpr size_t kBlockHalfBytes = 128 * 4 * 128 * 2;

inline std::string MakeTempDir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string path = std::string(base != nullptr ? base : "/tmp") + "/block_store_XXXXXX";
  if (::mkdtemp(path.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed for " << path;
  return path;
}

// Bytes the directory occupies on disk (allocated blocks, not apparent sizes).
inline uint64_t DiskUsageBytes(const std::string& dir) {
  uint64_t total = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    struct stat st;
    if (::lstat(entry.path().c_str(), &st) == 0) total += uint64_t{512} * st.st_blocks;
  }
  return total;
}

inline std::vector<std::filesystem::path> FilesEndingWith(const std::string& dir,
                                                          const std::string& suffix) {
  std::vector<std::filesystem::path> found;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file() && absl::EndsWith(entry.path().string(), suffix)) {
      found.push_back(entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

inline void FlipByteInFile(const std::filesystem::path& path, uint64_t offset) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(file.good()) << path;
  file.seekg(static_cast<std::streamoff>(offset));
  char byte = 0;
  file.get(byte);
  file.seekp(static_cast<std::streamoff>(offset));
  file.put(static_cast<char>(byte ^ 0x5a));
  ASSERT_TRUE(file.good()) << path << " at " << offset;
}

inline std::string RandomBytes(size_t size, std::mt19937_64& rng) {
  std::string bytes(size, '\0');
  for (size_t i = 0; i < size; i += 8) {
    const uint64_t word = rng();
    for (size_t j = 0; j < 8 && i + j < size; ++j)
      bytes[i + j] = static_cast<char>(word >> (8 * j));
  }
  return bytes;
}

// A block the test owns, so the BlockWrite views stay valid.
struct TestBlock {
  BlockId id;
  std::string key;
  std::string value;

  BlockWrite Write() const { return BlockWrite{id, key, value, BlockChecksum(key, value)}; }
};

inline TestBlock RandomBlock(BlockId id, std::mt19937_64& rng,
                             size_t half_bytes = kBlockHalfBytes) {
  return TestBlock{id, RandomBytes(half_bytes, rng), RandomBytes(half_bytes, rng)};
}

inline std::vector<BlockWrite> Writes(const std::vector<TestBlock>& blocks) {
  std::vector<BlockWrite> writes;
  for (const TestBlock& block : blocks) writes.push_back(block.Write());
  return writes;
}

inline void ExpectSameBlock(const BlockData& actual, const TestBlock& expected) {
  EXPECT_EQ(actual.id, expected.id);
  // Compared as booleans: a failure must not print 256 KiB of bytes.
  EXPECT_TRUE(actual.key == expected.key)
      << "K differs for layer " << expected.id.layer << " index " << expected.id.block_index;
  EXPECT_TRUE(actual.value == expected.value)
      << "V differs for layer " << expected.id.layer << " index " << expected.id.block_index;
  EXPECT_EQ(actual.checksum, BlockChecksum(expected.key, expected.value));
}

// Corrupt block reads summed over every tier.
inline uint64_t CorruptBlocks(BlockStore& store) {
  uint64_t total = 0;
  for (const TierStats& tier : store.Stats()) total += tier.corrupt_blocks;
  return total;
}

// Sends what spdlog's default logger writes to a string while it lives.
class CapturedLog {
 public:
  CapturedLog() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(stream_);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("captured", std::move(sink)));
  }
  ~CapturedLog() { spdlog::set_default_logger(previous_); }
  CapturedLog(const CapturedLog&) = delete;
  CapturedLog& operator=(const CapturedLog&) = delete;

  // Lines written so far that contain `text`.
  std::vector<std::string> LinesContaining(absl::string_view text) const {
    std::vector<std::string> lines;
    std::istringstream in(stream_.str());
    for (std::string line; std::getline(in, line);) {
      if (absl::StrContains(line, text)) lines.push_back(line);
    }
    return lines;
  }

 private:
  std::ostringstream stream_;
  std::shared_ptr<spdlog::logger> previous_;
};

}  // namespace kvstar::storage

#endif  // KVSTAR_TESTS_STORAGE_STORE_TEST_UTIL_H_
