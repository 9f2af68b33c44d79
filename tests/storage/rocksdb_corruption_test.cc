// The RocksDB backend never hides damage: bytes flipped in its real write-ahead log fail the open
// with DataLoss, a torn last record (a crash mid-write, never acknowledged) does not, and bytes
// flipped in a real table file make that one block DataLoss, logged and counted.
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "storage/block_store.h"
#include "tests/storage/store_test_util.h"

namespace kvstar::storage {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr size_t kHalfBytes = 64 << 10;

class RocksDbCorruptionTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir(); }

  absl::StatusOr<std::unique_ptr<BlockStore>> Open() { return OpenRocksDbStore(dir_); }

  // One sequence, one synced batch (one WAL record) per block, each acknowledged.
  void WriteBatches(int count) {
    absl::StatusOr<std::unique_ptr<BlockStore>> store = Open();
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE((*store)->PutSequence("seq", "profile").ok());
    for (int i = 0; i < count; ++i) {
      blocks_.push_back(RandomBlock({0, static_cast<uint32_t>(i)}, rng_, kHalfBytes));
      ASSERT_TRUE((*store)->PutBlocks("seq", {blocks_.back().Write()}).ok());
    }
  }

  fs::path OnlyFile(const std::string& suffix) {
    const std::vector<fs::path> files = FilesEndingWith(dir_, suffix);
    EXPECT_EQ(files.size(), 1u) << suffix;
    return files.empty() ? fs::path() : files.back();
  }

  std::mt19937_64 rng_{11};
  std::string dir_;
  std::vector<TestBlock> blocks_;
};

TEST_F(RocksDbCorruptionTest, FlippedByteInTheWalFailsTheOpenWithDataLoss) {
  WriteBatches(8);
  // Closed without a flush: every acknowledged write lives only in the WAL.
  const fs::path wal = OnlyFile(".log");
  ASSERT_TRUE(FilesEndingWith(dir_, ".sst").empty());
  const uint64_t size = fs::file_size(wal);
  ASSERT_GT(size, 8 * 2 * kHalfBytes);
  FlipByteInFile(wal, size / 2);  // in the 4th or 5th record: intact acknowledged records follow

  // What RocksDB's default recovery does with the same damage: opens, and the later writes
  // are gone. The store must not do this.
  const std::string copy = dir_ + "-default-recovery";
  fs::copy(dir_, copy, fs::copy_options::recursive);
  {
    rocksdb::DB* raw_db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), copy, &raw_db).ok());
    std::unique_ptr<rocksdb::DB> db(raw_db);
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    int records = 0;
    for (it->SeekToFirst(); it->Valid(); it->Next()) ++records;
    EXPECT_LT(records, 9) << "default recovery should have dropped the records after the damage";
  }

  absl::StatusOr<std::unique_ptr<BlockStore>> store = Open();
  ASSERT_FALSE(store.ok());
  EXPECT_TRUE(absl::IsDataLoss(store.status())) << store.status();
  EXPECT_THAT(std::string(store.status().message()), HasSubstr("write-ahead log"));
  EXPECT_THAT(std::string(store.status().message()), HasSubstr(dir_));
  // Refusing is repeatable: the failed open did not "repair" the log by truncating it.
  EXPECT_TRUE(absl::IsDataLoss(Open().status()));
}

TEST_F(RocksDbCorruptionTest, TornLastWalRecordIsToleratedAndEarlierWritesSurvive) {
  WriteBatches(4);
  const fs::path wal = OnlyFile(".log");
  // A crash in the middle of appending the last record: it was never acknowledged.
  fs::resize_file(wal, fs::file_size(wal) - kHalfBytes);

  absl::StatusOr<std::unique_ptr<BlockStore>> store = Open();
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<std::vector<BlockId>> ids = (*store)->ListBlocks("seq");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->size(), 3u);
  std::vector<BlockData> out;
  ASSERT_TRUE((*store)->GetBlocks("seq", *ids, &out).ok());
  for (size_t i = 0; i < 3; ++i) ExpectSameBlock(out[i], blocks_[i]);
}

TEST_F(RocksDbCorruptionTest, FlippedByteInATableFileIsDataLossForThatBlockOnly) {
  WriteBatches(6);
  {
    // Recovery flushes the WAL into a table file.
    absl::StatusOr<std::unique_ptr<BlockStore>> store = Open();
    ASSERT_TRUE(store.ok()) << store.status();
  }
  const fs::path table = OnlyFile(".sst");
  ASSERT_GT(fs::file_size(table), 6 * 2 * kHalfBytes);
  FlipByteInFile(table, fs::file_size(table) / 2);  // inside one block's bytes

  absl::StatusOr<std::unique_ptr<BlockStore>> store = Open();
  ASSERT_TRUE(store.ok()) << store.status();
  CapturedLog log;
  int damaged = 0;
  for (const TestBlock& block : blocks_) {
    std::vector<BlockData> out;
    const absl::Status status = (*store)->GetBlocks("seq", {block.id}, &out);
    if (status.ok()) {
      ExpectSameBlock(out[0], block);
      continue;
    }
    ++damaged;
    EXPECT_TRUE(absl::IsDataLoss(status)) << status;
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("index " + std::to_string(block.id.block_index)));
  }
  EXPECT_EQ(damaged, 1);
  EXPECT_EQ(CorruptBlocks(**store), 1u);
  EXPECT_EQ(log.LinesContaining("event=corrupt_block tier=rocksdb ").size(), 1u);
}

}  // namespace
}  // namespace kvstar::storage
