// The BlockStore contract (storage/block_store.h), checked against every backend on a real
// temporary directory: RocksDB, the POSIX directory store, and the DRAM tier over each.
#include "storage/block_store.h"

#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "storage/posix_dir_store.h"
#include "storage/posix_io.h"
#include "storage/rocksdb_store.h"
#include "tests/storage/store_test_util.h"

namespace kvstar::storage {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Each backend: how to open it in a directory and how to damage one stored block's bytes while
// the store is closed.
struct RocksDbBackend {
  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(const std::string& dir) {
    return OpenRocksDbStore(dir);
  }
  // Rewrites the record through RocksDB with one byte of V flipped: RocksDB's own checksums stay
  // valid, so only the store's block checksum can notice.
  static void CorruptBlock(const std::string& dir, const std::string& sequence_key, BlockId id) {
    rocksdb::DB* raw_db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), dir, &raw_db).ok());
    std::unique_ptr<rocksdb::DB> db(raw_db);
    const std::string key = RocksDbBlockKey(sequence_key, id);
    std::string value;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), key, &value).ok());
    value.back() ^= 0x5a;
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), key, value).ok());
  }
};

struct PosixDirBackend {
  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(const std::string& dir) {
    return OpenPosixDirStore(dir);
  }
  // Flips the first byte of every segment (the first block's K); the tests that use this store
  // one block per segment.
  static void CorruptBlock(const std::string& dir, const std::string&, BlockId) {
    const std::vector<fs::path> segments = FilesEndingWith(dir, ".seg");
    ASSERT_FALSE(segments.empty());
    for (const fs::path& segment : segments) FlipByteInFile(segment, 0);
  }
};

template <typename Backend, uint64_t kBudgetBytes>
struct DramTierOver {
  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(const std::string& dir) {
    absl::StatusOr<std::unique_ptr<BlockStore>> backend = Backend::Open(dir);
    if (!backend.ok()) return backend.status();
    return NewDramTier(*std::move(backend), kBudgetBytes);
  }
  static void CorruptBlock(const std::string& dir, const std::string& sequence_key, BlockId id) {
    Backend::CorruptBlock(dir, sequence_key, id);
  }
};

// Four blocks' worth over RocksDB, so the larger tests evict; plenty over the directory store.
using DramOverRocksDb = DramTierOver<RocksDbBackend, 8 * kBlockHalfBytes>;
using DramOverPosixDir = DramTierOver<PosixDirBackend, 64 << 20>;

template <typename Backend>
class BlockStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    Reopen();
  }

  void Reopen() {
    store_.reset();
    absl::StatusOr<std::unique_ptr<BlockStore>> store = Backend::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  void CreateSequence(const std::string& sequence_key, const std::string& metadata = "profile") {
    ASSERT_TRUE(store_->PutSequence(sequence_key, metadata).ok());
  }

  void Put(const std::string& sequence_key, const std::vector<TestBlock>& blocks) {
    const absl::Status status = store_->PutBlocks(sequence_key, Writes(blocks));
    ASSERT_TRUE(status.ok()) << status;
  }

  std::vector<BlockData> Get(const std::string& sequence_key, const std::vector<BlockId>& ids) {
    std::vector<BlockData> out;
    const absl::Status status = store_->GetBlocks(sequence_key, ids, &out);
    EXPECT_TRUE(status.ok()) << status;
    return out;
  }

  std::vector<BlockId> List(const std::string& sequence_key) {
    absl::StatusOr<std::vector<BlockId>> ids = store_->ListBlocks(sequence_key);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<BlockId>{};
  }

  std::mt19937_64 rng_{42};
  std::string dir_;
  std::unique_ptr<BlockStore> store_;
};

using Backends =
    ::testing::Types<RocksDbBackend, PosixDirBackend, DramOverRocksDb, DramOverPosixDir>;
class BackendNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    if (std::is_same_v<T, RocksDbBackend>) return "RocksDb";
    if (std::is_same_v<T, PosixDirBackend>) return "PosixDir";
    if (std::is_same_v<T, DramOverRocksDb>) return "DramOverRocksDb";
    return "DramOverPosixDir";
  }
};
TYPED_TEST_SUITE(BlockStoreTest, Backends, BackendNames);

TYPED_TEST(BlockStoreTest, PutThenGetReturnsBitExactBytes) {
  this->CreateSequence("seq");
  std::vector<TestBlock> blocks;
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t index = 0; index < 3; ++index) {
      blocks.push_back(RandomBlock({layer, index}, this->rng_));
    }
  }
  this->Put("seq", blocks);
  std::vector<BlockId> ids;
  for (const TestBlock& block : blocks) ids.push_back(block.id);
  const std::vector<BlockData> read = this->Get("seq", ids);
  ASSERT_EQ(read.size(), blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) ExpectSameBlock(read[i], blocks[i]);
}

TYPED_TEST(BlockStoreTest, OverwriteReplacesBlockAndItsSize) {
  this->CreateSequence("seq");
  this->Put("seq", {RandomBlock({0, 0}, this->rng_), RandomBlock({0, 1}, this->rng_)});
  const TestBlock replacement = RandomBlock({0, 0}, this->rng_, kBlockHalfBytes / 2);
  this->Put("seq", {replacement});

  const std::vector<BlockData> read = this->Get("seq", {{0, 0}});
  ASSERT_EQ(read.size(), 1u);
  ExpectSameBlock(read[0], replacement);
  EXPECT_THAT(this->List("seq"), ElementsAre(BlockId{0, 0}, BlockId{0, 1}));
  const TierStats backend = this->store_->Stats().back();
  EXPECT_EQ(backend.blocks, 2u);
  EXPECT_EQ(backend.bytes, kBlockHalfBytes + 2 * kBlockHalfBytes);
}

TYPED_TEST(BlockStoreTest, ListBlocksIsSortedByLayerThenIndex) {
  this->CreateSequence("seq");
  const size_t small = 1024;
  this->Put("seq", {RandomBlock({2, 1}, this->rng_, small), RandomBlock({0, 7}, this->rng_, small),
                    RandomBlock({1, 0}, this->rng_, small)});
  this->Put("seq",
            {RandomBlock({0, 2}, this->rng_, small), RandomBlock({2, 0}, this->rng_, small)});
  EXPECT_THAT(this->List("seq"), ElementsAre(BlockId{0, 2}, BlockId{0, 7}, BlockId{1, 0},
                                             BlockId{2, 0}, BlockId{2, 1}));
}

TYPED_TEST(BlockStoreTest, GetBlocksReturnsBlocksInRequestedOrder) {
  this->CreateSequence("seq");
  std::vector<TestBlock> blocks = {RandomBlock({0, 0}, this->rng_), RandomBlock({0, 1}, this->rng_),
                                   RandomBlock({1, 0}, this->rng_),
                                   RandomBlock({1, 1}, this->rng_)};
  this->Put("seq", blocks);
  // Out of storage order, across layers, with one block asked for twice.
  const std::vector<size_t> order = {3, 0, 2, 1, 3};
  std::vector<BlockId> ids;
  for (size_t i : order) ids.push_back(blocks[i].id);
  const std::vector<BlockData> read = this->Get("seq", ids);
  ASSERT_EQ(read.size(), order.size());
  for (size_t i = 0; i < order.size(); ++i) ExpectSameBlock(read[i], blocks[order[i]]);
}

TYPED_TEST(BlockStoreTest, ReadBlocksReturnsWhatGetBlocksReturnsAndFailsTheSameWay) {
  this->CreateSequence("seq");
  std::vector<TestBlock> blocks = {RandomBlock({0, 0}, this->rng_), RandomBlock({1, 0}, this->rng_),
                                   RandomBlock({1, 1}, this->rng_)};
  this->Put("seq", blocks);
  const std::vector<BlockId> ids = {blocks[2].id, blocks[0].id, blocks[1].id, blocks[2].id};
  std::vector<SharedBlockData> shared;
  ASSERT_TRUE(this->store_->ReadBlocks("seq", ids, &shared).ok());
  const std::vector<BlockData> copied = this->Get("seq", ids);
  ASSERT_EQ(shared.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_NE(shared[i], nullptr);
    EXPECT_EQ(shared[i]->id, ids[i]);
    EXPECT_EQ(shared[i]->key, copied[i].key);
    EXPECT_EQ(shared[i]->value, copied[i].value);
    EXPECT_EQ(shared[i]->checksum, copied[i].checksum);
  }
  const absl::Status missing =
      this->store_->ReadBlocks("seq", {BlockId{0, 0}, BlockId{0, 9}}, &shared);
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
  EXPECT_THAT(std::string(missing.message()), HasSubstr("layer 0, index 9"));
  EXPECT_TRUE(absl::IsNotFound(this->store_->ReadBlocks("nope", {BlockId{0, 0}}, &shared)));
}

TYPED_TEST(BlockStoreTest, UnknownSequenceIsNotFound) {
  BlockStore& store = *this->store_;
  const TestBlock block = RandomBlock({0, 0}, this->rng_, 64);
  std::vector<BlockData> out;
  EXPECT_TRUE(absl::IsNotFound(store.GetSequence("nope").status()));
  EXPECT_TRUE(absl::IsNotFound(store.PutBlocks("nope", {block.Write()})));
  EXPECT_TRUE(absl::IsNotFound(store.GetBlocks("nope", {BlockId{0, 0}}, &out)));
  EXPECT_TRUE(absl::IsNotFound(store.ListBlocks("nope").status()));
  EXPECT_TRUE(absl::IsNotFound(store.DropSequence("nope").status()));
  const absl::Status status = store.GetSequence("nope").status();
  EXPECT_THAT(std::string(status.message()), HasSubstr("nope"));
}

TYPED_TEST(BlockStoreTest, MissingBlockIsNotFoundNamingIt) {
  this->CreateSequence("seq");
  this->Put("seq", {RandomBlock({3, 6}, this->rng_, 64)});
  std::vector<BlockData> out;
  const absl::Status status = this->store_->GetBlocks("seq", {BlockId{3, 6}, BlockId{3, 7}}, &out);
  EXPECT_TRUE(absl::IsNotFound(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("layer 3, index 7"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("seq"));
}

TYPED_TEST(BlockStoreTest, WrongChecksumIsRejectedAndStoreUnchanged) {
  this->CreateSequence("seq");
  const TestBlock original = RandomBlock({0, 0}, this->rng_);
  this->Put("seq", {original});

  const TestBlock good = RandomBlock({0, 0}, this->rng_);
  const TestBlock bad = RandomBlock({0, 5}, this->rng_);
  std::vector<BlockWrite> writes = {good.Write(), bad.Write()};
  writes[1].checksum ^= 1;
  const absl::Status status = this->store_->PutBlocks("seq", writes);
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("layer 0, index 5"));

  EXPECT_THAT(this->List("seq"), ElementsAre(BlockId{0, 0}));
  const std::vector<BlockData> read = this->Get("seq", {{0, 0}});
  ASSERT_EQ(read.size(), 1u);
  ExpectSameBlock(read[0], original);
}

TYPED_TEST(BlockStoreTest, DuplicateIdInOneBatchIsRejected) {
  this->CreateSequence("seq");
  const TestBlock first = RandomBlock({1, 2}, this->rng_, 64);
  const TestBlock second = RandomBlock({1, 2}, this->rng_, 64);
  const absl::Status status = this->store_->PutBlocks("seq", {first.Write(), second.Write()});
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("layer 1, index 2"));
  EXPECT_TRUE(this->List("seq").empty());
}

TYPED_TEST(BlockStoreTest, DropRemovesEverythingAndFreesDisk) {
  this->CreateSequence("kept");
  this->Put("kept", {RandomBlock({0, 0}, this->rng_, 1024)});
  this->CreateSequence("dropped");
  std::vector<TestBlock> blocks;
  for (uint32_t index = 0; index < 16; ++index) {
    blocks.push_back(RandomBlock({index % 2, index}, this->rng_));
  }
  this->Put("dropped", blocks);
  const uint64_t payload = 16 * 2 * kBlockHalfBytes;  // 4 MiB
  const uint64_t before = DiskUsageBytes(this->dir_);
  ASSERT_GE(before, payload);

  absl::StatusOr<DropResult> dropped = this->store_->DropSequence("dropped");
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(dropped->blocks, 16u);
  EXPECT_EQ(dropped->bytes, payload);

  // RocksDB gives the space back in the background; the drop itself is already durable.
  this->store_->WaitForBackgroundWork();
  const uint64_t after = DiskUsageBytes(this->dir_);
  EXPECT_LT(after + payload * 3 / 4, before) << "before " << before << " after " << after;
  EXPECT_TRUE(absl::IsNotFound(this->store_->GetSequence("dropped").status()));
  EXPECT_TRUE(absl::IsNotFound(this->store_->ListBlocks("dropped").status()));
  std::vector<BlockData> out;
  EXPECT_TRUE(absl::IsNotFound(this->store_->GetBlocks("dropped", {BlockId{0, 0}}, &out)));
  absl::StatusOr<std::vector<std::string>> sequences = this->store_->ListSequences();
  ASSERT_TRUE(sequences.ok());
  EXPECT_THAT(*sequences, ElementsAre("kept"));
  for (const TierStats& tier : this->store_->Stats()) {
    EXPECT_LE(tier.blocks, 1u) << tier.name;
    EXPECT_EQ(tier.reclaim_pending_bytes, 0u) << tier.name;
  }

  // Dropped stays dropped across a restart, and the name can be used again.
  this->Reopen();
  EXPECT_TRUE(absl::IsNotFound(this->store_->GetSequence("dropped").status()));
  this->CreateSequence("dropped");
  EXPECT_TRUE(this->List("dropped").empty());
}

TYPED_TEST(BlockStoreTest, SequenceCreatedAgainRightAfterItsDropKeepsItsNewBlocks) {
  this->CreateSequence("reused");
  std::vector<TestBlock> old_blocks;
  for (uint32_t index = 0; index < 8; ++index) {
    old_blocks.push_back(RandomBlock({0, index}, this->rng_));
  }
  this->Put("reused", old_blocks);
  ASSERT_TRUE(this->store_->DropSequence("reused").ok());
  // Created and written again while the old one's space may still be being reclaimed: the
  // reclaim must discard only what the drop deleted.
  this->CreateSequence("reused", "profile-2");
  const std::vector<TestBlock> new_blocks = {RandomBlock({0, 1}, this->rng_),
                                             RandomBlock({0, 9}, this->rng_)};
  this->Put("reused", new_blocks);

  for (int reopened = 0; reopened < 2; ++reopened) {
    this->store_->WaitForBackgroundWork();
    EXPECT_THAT(this->List("reused"), ElementsAre(BlockId{0, 1}, BlockId{0, 9}));
    const std::vector<BlockData> read = this->Get("reused", {{0, 1}, {0, 9}});
    ASSERT_EQ(read.size(), 2u);
    ExpectSameBlock(read[0], new_blocks[0]);
    ExpectSameBlock(read[1], new_blocks[1]);
    std::vector<BlockData> out;
    EXPECT_TRUE(absl::IsNotFound(this->store_->GetBlocks("reused", {BlockId{0, 0}}, &out)));
    absl::StatusOr<std::string> metadata = this->store_->GetSequence("reused");
    ASSERT_TRUE(metadata.ok()) << metadata.status();
    EXPECT_EQ(*metadata, "profile-2");
    this->Reopen();
  }
}

TYPED_TEST(BlockStoreTest, ReopenKeepsSequencesMetadataAndBlocks) {
  this->CreateSequence("alpha", "profile-a");
  this->CreateSequence("beta", "profile-b-old");
  this->CreateSequence("beta", "profile-b");
  const std::vector<TestBlock> alpha = {RandomBlock({0, 0}, this->rng_),
                                        RandomBlock({1, 0}, this->rng_)};
  this->Put("alpha", alpha);
  this->Put("beta", {RandomBlock({0, 0}, this->rng_, 1000)});
  const TestBlock beta_current = RandomBlock({0, 0}, this->rng_, 2000);
  this->Put("beta", {beta_current});

  this->Reopen();

  absl::StatusOr<std::vector<std::string>> sequences = this->store_->ListSequences();
  ASSERT_TRUE(sequences.ok());
  EXPECT_THAT(*sequences, ElementsAre("alpha", "beta"));
  EXPECT_EQ(*this->store_->GetSequence("alpha"), "profile-a");
  EXPECT_EQ(*this->store_->GetSequence("beta"), "profile-b");
  EXPECT_THAT(this->List("alpha"), ElementsAre(BlockId{0, 0}, BlockId{1, 0}));
  const std::vector<BlockData> alpha_read = this->Get("alpha", {{0, 0}, {1, 0}});
  ASSERT_EQ(alpha_read.size(), 2u);
  ExpectSameBlock(alpha_read[0], alpha[0]);
  ExpectSameBlock(alpha_read[1], alpha[1]);
  const std::vector<BlockData> beta_read = this->Get("beta", {{0, 0}});
  ASSERT_EQ(beta_read.size(), 1u);
  ExpectSameBlock(beta_read[0], beta_current);
  const TierStats backend = this->store_->Stats().back();
  EXPECT_EQ(backend.blocks, 3u);
  EXPECT_EQ(backend.bytes, 2 * 2 * kBlockHalfBytes + 2 * 2000);
}

TYPED_TEST(BlockStoreTest, CorruptedStoredBytesAreDataLossLoggedOnceAndCounted) {
  // A newline in the key must not forge a second log line.
  const std::string key = "seq\nforged";
  this->CreateSequence(key);
  this->Put(key, {RandomBlock({2, 5}, this->rng_)});
  this->store_.reset();
  TypeParam::CorruptBlock(this->dir_, key, BlockId{2, 5});
  this->Reopen();
  EXPECT_EQ(CorruptBlocks(*this->store_), 0u);
  CapturedLog log;
  std::vector<BlockData> out;
  const absl::Status status = this->store_->GetBlocks(key, {BlockId{2, 5}}, &out);
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("layer 2, index 5"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("seq\\nforged"));
  EXPECT_EQ(CorruptBlocks(*this->store_), 1u);
  const std::vector<std::string> lines = log.LinesContaining("event=corrupt_block ");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], HasSubstr("seq\\x0aforged\" layer=2 block=5"));
  EXPECT_TRUE(log.LinesContaining("forged\"").size() == 1) << "the key broke the line";
}

TYPED_TEST(BlockStoreTest, ConcurrentPutsAndGetsFromManyThreadsStayConsistent) {
  constexpr int kThreads = 4;
  constexpr uint32_t kRounds = 8;
  constexpr size_t kHalfBytes = 16 << 10;
  this->CreateSequence("shared");
  std::mt19937_64 shared_rng(7);
  const std::vector<TestBlock> shared = {RandomBlock({0, 0}, shared_rng, kHalfBytes),
                                         RandomBlock({0, 1}, shared_rng, kHalfBytes)};
  this->Put("shared", shared);
  BlockStore* store = this->store_.get();

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([store, &shared, t] {
      std::mt19937_64 rng(100 + t);
      const std::string own = "thread-" + std::to_string(t);
      ASSERT_TRUE(store->PutSequence(own, "profile").ok());
      for (uint32_t round = 0; round < kRounds; ++round) {
        // Each round overwrites block (0, 0) and adds (1, round).
        const std::vector<TestBlock> blocks = {RandomBlock({0, 0}, rng, kHalfBytes),
                                               RandomBlock({1, round}, rng, kHalfBytes)};
        ASSERT_TRUE(store->PutBlocks(own, Writes(blocks)).ok());
        std::vector<BlockData> read;
        ASSERT_TRUE(store->GetBlocks(own, {BlockId{1, round}, BlockId{0, 0}}, &read).ok());
        ExpectSameBlock(read[0], blocks[1]);
        ExpectSameBlock(read[1], blocks[0]);
        ASSERT_TRUE(store->GetBlocks("shared", {BlockId{0, 1}, BlockId{0, 0}}, &read).ok());
        ExpectSameBlock(read[0], shared[1]);
        ExpectSameBlock(read[1], shared[0]);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(this->List("thread-" + std::to_string(t)).size(), kRounds + 1);
  }
  EXPECT_EQ(this->store_->Stats().back().blocks, kThreads * (kRounds + 1) + 2u);
}

TYPED_TEST(BlockStoreTest, StatsCountBlocksBytesAndReads) {
  this->CreateSequence("seq");
  this->Put("seq", {RandomBlock({0, 0}, this->rng_, 1000), RandomBlock({0, 1}, this->rng_, 3000)});
  this->Get("seq", {{0, 0}, {0, 1}});
  this->Get("seq", {{0, 1}});
  std::vector<BlockData> out;
  EXPECT_FALSE(this->store_->GetBlocks("seq", {BlockId{9, 9}}, &out).ok());

  const std::vector<TierStats> stats = this->store_->Stats();
  ASSERT_FALSE(stats.empty());
  const TierStats& backend = stats.back();
  EXPECT_TRUE(backend.name == "rocksdb" || backend.name == "nfs") << backend.name;
  EXPECT_EQ(backend.blocks, 2u);
  EXPECT_EQ(backend.bytes, 2 * 1000 + 2 * 3000u);
  uint64_t hits = 0;
  for (const TierStats& tier : stats) hits += tier.hits;
  EXPECT_EQ(hits, 3u);  // each successful block read is served by exactly one tier
  EXPECT_GE(stats.front().misses, 1u);
  if (stats.size() == 2) {
    EXPECT_EQ(stats.front().name, "dram");
    EXPECT_EQ(stats.front().blocks, 2u);
    EXPECT_EQ(stats.front().hits, 3u);  // written through, so every read was a hit
  }
}

TYPED_TEST(BlockStoreTest, PutSequenceReplacesMetadataAndKeysMayHoldAnyByte) {
  const std::string odd_key("a\0/..\xff", 6);
  this->CreateSequence("b", "one");
  this->CreateSequence(odd_key, "two");
  this->CreateSequence("b", "three");
  EXPECT_EQ(*this->store_->GetSequence("b"), "three");
  EXPECT_EQ(*this->store_->GetSequence(odd_key), "two");
  this->Put(odd_key, {RandomBlock({0, 0}, this->rng_, 64)});
  this->Reopen();
  absl::StatusOr<std::vector<std::string>> sequences = this->store_->ListSequences();
  ASSERT_TRUE(sequences.ok());
  EXPECT_THAT(*sequences, ElementsAre(odd_key, "b"));
  EXPECT_THAT(this->List(odd_key), ElementsAre(BlockId{0, 0}));
  EXPECT_TRUE(absl::IsInvalidArgument(this->store_->PutSequence("", "x")));
}

// ---- POSIX directory store specifics ----

class PosixDirStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir(); }

  std::unique_ptr<BlockStore> Open() {
    absl::StatusOr<std::unique_ptr<BlockStore>> store = OpenPosixDirStore(dir_);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }

  std::mt19937_64 rng_{9};
  std::string dir_;
};

TEST_F(PosixDirStoreTest, CrashLeftoverTempFilesAreIgnoredAndRemovedAtOpen) {
  const TestBlock block = RandomBlock({0, 0}, rng_, 4096);
  {
    std::unique_ptr<BlockStore> store = Open();
    ASSERT_TRUE(store->PutSequence("seq", "profile").ok());
    ASSERT_TRUE(store->PutBlocks("seq", {block.Write()}).ok());
  }
  const std::vector<fs::path> metas = FilesEndingWith(dir_, "/meta");
  ASSERT_EQ(metas.size(), 1u);
  const fs::path sequence_dir = metas[0].parent_path();
  // What a crash between write and rename leaves: a temp segment with a plausible name and
  // garbage (here: half a segment) in it.
  const fs::path leftover = sequence_dir / (std::string(kTempFilePrefix) + "dead-1-00.seg");
  std::ofstream(leftover) << std::string(1000, 'x');

  std::unique_ptr<BlockStore> store = Open();
  EXPECT_FALSE(fs::exists(leftover));
  std::vector<BlockData> out;
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 0}}, &out).ok());
  ExpectSameBlock(out[0], block);
  EXPECT_THAT(*store->ListBlocks("seq"), ElementsAre(BlockId{0, 0}));
}

TEST_F(PosixDirStoreTest, BatchCutShortByACrashIsDiscardedWhole) {
  const TestBlock first = RandomBlock({0, 0}, rng_, 4096);
  {
    std::unique_ptr<BlockStore> store = Open();
    ASSERT_TRUE(store->PutSequence("seq", "profile").ok());
    // (0, 1) keeps the first segment alive after (0, 0) is superseded.
    ASSERT_TRUE(
        store->PutBlocks("seq", {first.Write(), RandomBlock({0, 1}, rng_, 4096).Write()}).ok());
    const std::vector<TestBlock> batch = {RandomBlock({0, 0}, rng_, 4096),
                                          RandomBlock({1, 0}, rng_, 4096)};
    ASSERT_TRUE(store->PutBlocks("seq", Writes(batch)).ok());
  }
  // The second batch wrote one segment per layer; lose its layer-1 segment as if the crash came
  // before that rename reached the disk.
  std::vector<fs::path> segments = FilesEndingWith(dir_, ".seg");
  ASSERT_EQ(segments.size(), 3u);
  fs::remove(segments.back());

  std::unique_ptr<BlockStore> store = Open();
  EXPECT_THAT(*store->ListBlocks("seq"), ElementsAre(BlockId{0, 0}, BlockId{0, 1}));
  std::vector<BlockData> out;
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 0}}, &out).ok());
  EXPECT_TRUE(out[0].key == first.key) << "the old copy of (0, 0) should be current again";
}

// Lengths read from a damaged (or crafted) segment that wrap around when added must make open
// fail with DataLoss, not allocate exabytes (both found by tests/fuzz/block_record_fuzzer).
TEST_F(PosixDirStoreTest, SegmentLengthsThatWrapAroundAreDataLossAtOpen) {
  {
    std::unique_ptr<BlockStore> store = Open();
    ASSERT_TRUE(store->PutSequence("seq", "profile").ok());
    ASSERT_TRUE(store->PutBlocks("seq", {RandomBlock({0, 0}, rng_, 64).Write()}).ok());
  }
  const std::vector<fs::path> segments = FilesEndingWith(dir_, ".seg");
  ASSERT_EQ(segments.size(), 1u);
  std::string original;
  {
    std::ifstream in(segments[0], std::ios::binary);
    original.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  constexpr size_t kTrailerBytes = 48;
  ASSERT_EQ(original.size(), 128 + 36 + kTrailerBytes);  // K+V, one index entry, trailer
  const auto put64 = [](std::string* bytes, size_t at, uint64_t v) {
    for (int i = 0; i < 8; ++i) (*bytes)[at + i] = static_cast<char>(v >> (8 * i));
  };
  const size_t trailer = original.size() - kTrailerBytes;
  const auto rewrite = [&](const std::string& bytes) {
    std::ofstream(segments[0], std::ios::binary | std::ios::trunc) << bytes;
  };

  // Key length 1 and value length 2^64 - 1: their sum is 0, which fits any segment.
  std::string lengths = original;
  put64(&lengths, 128 + 12, 1);
  put64(&lengths, 128 + 20, ~uint64_t{0});
  put64(&lengths, trailer + 32, XXH3_64bits(lengths.data() + 128, 36 + 32));  // a valid index
  rewrite(lengths);
  absl::StatusOr<std::unique_ptr<BlockStore>> opened = OpenPosixDirStore(dir_);
  EXPECT_TRUE(absl::IsDataLoss(opened.status())) << opened.status();

  // 2^32 - 1 index entries, and an index offset that makes offset + index + trailer wrap around to
  // the file size.
  std::string count = original;
  for (int i = 0; i < 4; ++i) count[trailer + 8 + i] = '\xff';
  put64(&count, trailer, 128 + 36 - uint64_t{0xffffffff} * 36);
  rewrite(count);
  opened = OpenPosixDirStore(dir_);
  EXPECT_TRUE(absl::IsDataLoss(opened.status())) << opened.status();

  rewrite(original);
  opened = OpenPosixDirStore(dir_);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_THAT(*(*opened)->ListBlocks("seq"), ElementsAre(BlockId{0, 0}));
}

// Real file I/O that counts how often files are opened for reading.
class OpenCountingFileIo final : public FileIo {
 public:
  int opens_for_read() const { return opens_for_read_.load(); }

  absl::StatusOr<int> OpenForRead(const std::string& path) override {
    opens_for_read_.fetch_add(1);
    return real_->OpenForRead(path);
  }
  absl::StatusOr<int> CreateExclusive(const std::string& path) override {
    return real_->CreateExclusive(path);
  }
  absl::Status Close(int fd) override { return real_->Close(fd); }
  absl::Status WriteAt(int fd, absl::string_view data, uint64_t offset) override {
    return real_->WriteAt(fd, data, offset);
  }
  absl::Status ReadAt(int fd, uint64_t offset, uint64_t size, char* buffer) override {
    return real_->ReadAt(fd, offset, size, buffer);
  }
  absl::StatusOr<uint64_t> FileSize(int fd) override { return real_->FileSize(fd); }
  absl::Status Sync(int fd) override { return real_->Sync(fd); }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    return real_->Rename(from, to);
  }
  absl::Status Unlink(const std::string& path) override { return real_->Unlink(path); }
  absl::Status MakeDirectory(const std::string& path) override {
    return real_->MakeDirectory(path);
  }
  absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& path) override {
    return real_->ListDirectory(path);
  }
  absl::StatusOr<bool> IsDirectory(const std::string& path) override {
    return real_->IsDirectory(path);
  }
  absl::Status SyncDirectory(const std::string& path) override {
    return real_->SyncDirectory(path);
  }
  absl::Status RemoveTree(const std::string& path) override { return real_->RemoveTree(path); }

 private:
  FileIo* const real_ = DefaultFileIo();
  std::atomic<int> opens_for_read_{0};
};

TEST_F(PosixDirStoreTest, GetBlocksOpensEachSegmentOnceHoweverManyBlocksItReads) {
  OpenCountingFileIo io;
  absl::StatusOr<std::unique_ptr<BlockStore>> store = OpenPosixDirStoreWithIo(dir_, &io);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE((*store)->PutSequence("seq", "profile").ok());
  std::vector<TestBlock> blocks;
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t index = 0; index < 6; ++index) {
      blocks.push_back(RandomBlock({layer, index}, rng_, 2048));
    }
  }
  ASSERT_TRUE((*store)->PutBlocks("seq", Writes(blocks)).ok());
  const int opens_before = io.opens_for_read();
  std::vector<BlockId> ids;
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) ids.push_back(it->id);
  std::vector<BlockData> out;
  ASSERT_TRUE((*store)->GetBlocks("seq", ids, &out).ok());
  EXPECT_EQ(io.opens_for_read() - opens_before, 2);  // one segment per layer
  for (size_t i = 0; i < ids.size(); ++i) ExpectSameBlock(out[i], blocks[ids.size() - 1 - i]);
}

TEST_F(PosixDirStoreTest, OneSegmentPerLayerPerBatchAndWhollySupersededSegmentsAreDeleted) {
  std::unique_ptr<BlockStore> store = Open();
  ASSERT_TRUE(store->PutSequence("seq", "profile").ok());
  std::vector<TestBlock> blocks;
  for (uint32_t index = 0; index < 8; ++index) blocks.push_back(RandomBlock({0, index}, rng_, 512));
  ASSERT_TRUE(store->PutBlocks("seq", Writes(blocks)).ok());
  EXPECT_EQ(FilesEndingWith(dir_, ".seg").size(), 1u);  // one segment per layer per batch

  std::vector<TestBlock> rewritten;
  for (uint32_t index = 0; index < 8; ++index) {
    rewritten.push_back(RandomBlock({0, index}, rng_, 512));
  }
  ASSERT_TRUE(store->PutBlocks("seq", Writes({rewritten.begin(), rewritten.begin() + 4})).ok());
  EXPECT_EQ(FilesEndingWith(dir_, ".seg").size(), 2u);  // the first still holds 4 current blocks
  ASSERT_TRUE(store->PutBlocks("seq", Writes({rewritten.begin() + 4, rewritten.end()})).ok());
  EXPECT_EQ(FilesEndingWith(dir_, ".seg").size(), 2u);  // the first is now wholly superseded

  std::vector<BlockData> out;
  std::vector<BlockId> ids;
  for (const TestBlock& block : rewritten) ids.push_back(block.id);
  ASSERT_TRUE(store->GetBlocks("seq", ids, &out).ok());
  for (size_t i = 0; i < rewritten.size(); ++i) ExpectSameBlock(out[i], rewritten[i]);
}

TEST_F(PosixDirStoreTest, TooLongSequenceKeyIsInvalidArgument) {
  std::unique_ptr<BlockStore> store = Open();
  EXPECT_TRUE(absl::IsInvalidArgument(store->PutSequence(std::string(200, 'k'), "profile")));
}

// ---- DRAM tier specifics ----

// Passes everything to a real store and records what GetBlocks asked for.
class RecordingStore : public BlockStore {
 public:
  RecordingStore(std::unique_ptr<BlockStore> inner, std::vector<std::vector<BlockId>>* get_calls)
      : inner_(std::move(inner)), get_calls_(get_calls) {}
  absl::Status PutSequence(absl::string_view key, absl::string_view metadata) override {
    return inner_->PutSequence(key, metadata);
  }
  absl::StatusOr<std::string> GetSequence(absl::string_view key) override {
    return inner_->GetSequence(key);
  }
  absl::StatusOr<std::vector<std::string>> ListSequences() override {
    return inner_->ListSequences();
  }
  absl::Status PutBlocks(absl::string_view key, absl::Span<const BlockWrite> blocks) override {
    return inner_->PutBlocks(key, blocks);
  }
  absl::Status GetBlocks(absl::string_view key, absl::Span<const BlockId> ids,
                         std::vector<BlockData>* out) override {
    get_calls_->emplace_back(ids.begin(), ids.end());
    return inner_->GetBlocks(key, ids, out);
  }
  absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view key) override {
    return inner_->ListBlocks(key);
  }
  absl::StatusOr<DropResult> DropSequence(absl::string_view key) override {
    return inner_->DropSequence(key);
  }
  std::vector<TierStats> Stats() override { return inner_->Stats(); }

 private:
  std::unique_ptr<BlockStore> inner_;
  std::vector<std::vector<BlockId>>* get_calls_;
};

class DramTierTest : public ::testing::Test {
 protected:
  static constexpr size_t kHalfBytes = 1000;
  static constexpr uint64_t kBlockBytes = 2 * kHalfBytes;

  std::unique_ptr<BlockStore> NewTier(uint64_t budget_bytes) {
    absl::StatusOr<std::unique_ptr<BlockStore>> backend = OpenRocksDbStore(MakeTempDir());
    EXPECT_TRUE(backend.ok()) << backend.status();
    auto store = NewDramTier(std::make_unique<RecordingStore>(*std::move(backend), &get_calls_),
                             budget_bytes);
    EXPECT_TRUE(store->PutSequence("seq", "profile").ok());
    for (uint32_t index = 0; index < 4; ++index) {
      blocks_.push_back(RandomBlock({0, index}, rng_, kHalfBytes));
    }
    EXPECT_TRUE(store->PutBlocks("seq", Writes(blocks_)).ok());
    return store;
  }

  std::mt19937_64 rng_{5};
  std::vector<TestBlock> blocks_;
  std::vector<std::vector<BlockId>> get_calls_;
};

TEST_F(DramTierTest, BudgetBoundsCachedBytesByEvictingLeastRecentlyUsed) {
  std::unique_ptr<BlockStore> store = NewTier(2 * kBlockBytes + 10);
  TierStats dram = store->Stats().front();
  EXPECT_EQ(dram.blocks, 2u);  // blocks 2 and 3: the last two written
  EXPECT_EQ(dram.bytes, 2 * kBlockBytes);
  EXPECT_EQ(dram.evictions, 2u);
  EXPECT_EQ(dram.budget_bytes, 2 * kBlockBytes + 10);

  std::vector<BlockData> out;
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 2}}, &out).ok());  // 2 is now most recent
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 0}}, &out).ok());  // miss; evicts 3
  get_calls_.clear();
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 2}, BlockId{0, 0}}, &out).ok());
  EXPECT_TRUE(get_calls_.empty()) << "both should have been served from memory";
  ExpectSameBlock(out[0], blocks_[2]);
  ExpectSameBlock(out[1], blocks_[0]);
  dram = store->Stats().front();
  EXPECT_LE(dram.bytes, dram.budget_bytes);
  EXPECT_EQ(dram.evictions, 3u);
}

TEST_F(DramTierTest, MissesAreFetchedInOneBackendCall) {
  std::unique_ptr<BlockStore> store = NewTier(2 * kBlockBytes);  // holds blocks 2 and 3
  get_calls_.clear();
  std::vector<BlockData> out;
  ASSERT_TRUE(
      store->GetBlocks("seq", {BlockId{0, 3}, BlockId{0, 0}, BlockId{0, 2}, BlockId{0, 1}}, &out)
          .ok());
  ASSERT_EQ(get_calls_.size(), 1u);
  EXPECT_THAT(get_calls_[0], ElementsAre(BlockId{0, 0}, BlockId{0, 1}));
  ExpectSameBlock(out[0], blocks_[3]);
  ExpectSameBlock(out[1], blocks_[0]);
  ExpectSameBlock(out[2], blocks_[2]);
  ExpectSameBlock(out[3], blocks_[1]);
}

TEST_F(DramTierTest, ReadBlocksSharesHitsAndCachesMissesFetchedInOneBackendCall) {
  std::unique_ptr<BlockStore> store = NewTier(2 * kBlockBytes);  // holds blocks 2 and 3
  get_calls_.clear();
  std::vector<SharedBlockData> first, again;
  ASSERT_TRUE(store->ReadBlocks("seq", {BlockId{0, 3}, BlockId{0, 1}}, &first).ok());
  ASSERT_EQ(get_calls_.size(), 1u);
  EXPECT_THAT(get_calls_[0], ElementsAre(BlockId{0, 1}));
  ExpectSameBlock(*first[0], blocks_[3]);
  ExpectSameBlock(*first[1], blocks_[1]);
  // Block 1 is cached now (evicting 2): both are hits, handed out without a copy.
  ASSERT_TRUE(store->ReadBlocks("seq", {BlockId{0, 1}, BlockId{0, 3}}, &again).ok());
  EXPECT_EQ(get_calls_.size(), 1u) << "both should have been served from memory";
  EXPECT_EQ(again[0].get(), first[1].get());
  EXPECT_EQ(again[1].get(), first[0].get());
  ASSERT_TRUE(store->DropSequence("seq").ok());
  ExpectSameBlock(*again[0], blocks_[1]);  // held copies outlive the drop
}

TEST_F(DramTierTest, ZeroBudgetPassesEverythingThrough) {
  std::unique_ptr<BlockStore> store = NewTier(0);
  std::vector<BlockData> out;
  ASSERT_TRUE(store->GetBlocks("seq", {BlockId{0, 1}}, &out).ok());
  ExpectSameBlock(out[0], blocks_[1]);
  const TierStats dram = store->Stats().front();
  EXPECT_EQ(dram.blocks, 0u);
  EXPECT_EQ(dram.bytes, 0u);
  EXPECT_EQ(dram.hits, 0u);
  EXPECT_EQ(dram.misses, 1u);
}

TEST_F(DramTierTest, DropEvictsTheSequenceFromMemory) {
  std::unique_ptr<BlockStore> store = NewTier(1 << 20);
  EXPECT_EQ(store->Stats().front().blocks, 4u);
  ASSERT_TRUE(store->DropSequence("seq").ok());
  const TierStats dram = store->Stats().front();
  EXPECT_EQ(dram.blocks, 0u);
  EXPECT_EQ(dram.bytes, 0u);
  std::vector<BlockData> out;
  EXPECT_TRUE(absl::IsNotFound(store->GetBlocks("seq", {BlockId{0, 0}}, &out)));
}

}  // namespace
}  // namespace kvstar::storage
