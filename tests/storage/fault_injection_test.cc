// Faults injected through the storage I/O interfaces (storage/fault_injection.h) into real stores
// on real files: ENOSPC, EIO, short writes, failed fsyncs and bit flips, on the write-ahead log /
// segment files. Each case checks, against an expected state the test keeps:
//   - the caller sees a clean error Status (or, for a silent bit flip, DataLoss on the read),
//   - nothing acknowledged is lost, in the running store and after a reopen without faults,
//   - a batch that failed is applied whole or not at all,
//   - the store keeps serving other sequences, reads and writes.
#include "storage/fault_injection.h"

#include <atomic>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"
#include "storage/block_store.h"
#include "storage/posix_dir_store.h"
#include "storage/posix_io.h"
#include "storage/rocksdb_store.h"
#include "tests/storage/store_test_util.h"

namespace kvstar::storage {
namespace {

constexpr size_t kHalfBytes = 16 << 10;
constexpr uint32_t kBlocksPerBatch = 3;

enum class Backend { kRocksDb, kPosixDir };

struct FaultCase {
  std::string name;
  IoOperation operation;
  FaultKind kind;
};

// Where the bytes of acknowledged writes go: the WAL, or segment files.
std::string DataFileSuffix(Backend backend) {
  return backend == Backend::kRocksDb ? ".log" : ".seg";
}

class FaultInjectionTest : public ::testing::TestWithParam<std::tuple<Backend, FaultCase>> {
 protected:
  Backend backend() const { return std::get<0>(GetParam()); }
  const FaultCase& fault() const { return std::get<1>(GetParam()); }

  void SetUp() override {
    dir_ = MakeTempDir();
    file_system_ = NewFaultInjectingFileSystem(rocksdb::FileSystem::Default(), &faults_);
    env_ = rocksdb::NewCompositeEnv(file_system_);
    file_io_ = std::make_unique<FaultInjectingFileIo>(DefaultFileIo(), &faults_);
    Reopen();
  }

  void Reopen() {
    store_.reset();
    absl::StatusOr<std::unique_ptr<BlockStore>> store =
        backend() == Backend::kRocksDb ? OpenRocksDbStoreWithEnv(dir_, env_.get())
                                       : OpenPosixDirStoreWithIo(dir_, file_io_.get());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  // kBlocksPerBatch fresh blocks of layer 0 (indices 0..2), the same ids each time.
  std::vector<TestBlock> NewBatch() {
    std::vector<TestBlock> batch;
    for (uint32_t index = 0; index < kBlocksPerBatch; ++index) {
      batch.push_back(RandomBlock({0, index}, rng_, kHalfBytes));
    }
    return batch;
  }

  void PutAcknowledged(const std::string& sequence_key, std::vector<TestBlock> batch) {
    const absl::Status status = store_->PutBlocks(sequence_key, Writes(batch));
    ASSERT_TRUE(status.ok()) << status;
    acknowledged_[sequence_key] = std::move(batch);
  }

  // Every acknowledged block reads back bit-exact, or as one of the `failed` batches: a write
  // that answered an error may still have been applied (RocksDB replays a WAL record whose fsync
  // failed), but only whole.
  void ExpectState(const std::string& sequence_key,
                   const std::vector<std::vector<TestBlock>>& failed = {}) {
    const std::vector<TestBlock>& expected = acknowledged_.at(sequence_key);
    std::vector<BlockId> ids;
    for (const TestBlock& block : expected) ids.push_back(block.id);
    std::vector<BlockData> out;
    const absl::Status status = store_->GetBlocks(sequence_key, ids, &out);
    ASSERT_TRUE(status.ok()) << sequence_key << ": " << status;
    const std::vector<TestBlock>* want = &expected;
    for (const std::vector<TestBlock>& batch : failed) {
      if (out[0].key == batch[0].key) want = &batch;
    }
    for (size_t i = 0; i < want->size(); ++i) ExpectSameBlock(out[i], (*want)[i]);
  }

  std::mt19937_64 rng_{17};
  std::string dir_;
  FaultInjector faults_;
  std::shared_ptr<rocksdb::FileSystem> file_system_;
  std::unique_ptr<rocksdb::Env> env_;
  std::unique_ptr<FaultInjectingFileIo> file_io_;
  std::unique_ptr<BlockStore> store_;
  std::map<std::string, std::vector<TestBlock>> acknowledged_;
};

TEST_P(FaultInjectionTest, CleanErrorNothingAcknowledgedLostAndOtherSequencesServed) {
  ASSERT_TRUE(store_->PutSequence("victim", "profile").ok());
  ASSERT_TRUE(store_->PutSequence("bystander", "profile").ok());
  PutAcknowledged("victim", NewBatch());
  PutAcknowledged("bystander", NewBatch());

  const std::vector<TestBlock> failed = NewBatch();
  faults_.Arm({fault().operation, fault().kind, 1, 1, DataFileSuffix(backend())});
  const uint64_t injected_before = faults_.injected();
  absl::Status status = store_->PutBlocks("victim", Writes(failed));
  std::vector<std::vector<TestBlock>> maybe_applied;

  if (fault().operation == IoOperation::kRead) {
    // Reads: the write is fine; the damaged read is DataLoss, and a clean read later is intact.
    ASSERT_TRUE(status.ok()) << status;
    acknowledged_["victim"] = failed;
    // RocksDB serves a fresh write from its memtable; reopen so the read goes to the file.
    if (backend() == Backend::kRocksDb) {
      store_.reset();
      ASSERT_NO_FATAL_FAILURE(Reopen());
      // Reopening flushed the WAL into a table file; that is what reads come from now.
      faults_.Clear();
      faults_.Arm({fault().operation, fault().kind, 1, 1, ".sst"});
    }
    std::vector<BlockData> out;
    status = store_->GetBlocks("victim", {BlockId{0, 1}}, &out);
    EXPECT_EQ(faults_.injected(), injected_before + 1);
    EXPECT_TRUE(absl::IsDataLoss(status)) << status;
    EXPECT_EQ(CorruptBlocks(*store_), 1u);
  } else if (fault().kind == FaultKind::kBitFlip) {
    // A device that damages what it is given and says OK: the store cannot tell at write time,
    // but must never serve the damaged bytes as good ones.
    ASSERT_TRUE(status.ok()) << status;
    store_.reset();
    absl::StatusOr<std::unique_ptr<BlockStore>> reopened =
        backend() == Backend::kRocksDb ? OpenRocksDbStoreWithEnv(dir_, env_.get())
                                       : OpenPosixDirStoreWithIo(dir_, file_io_.get());
    if (!reopened.ok()) {
      // RocksDB finds the damage in its WAL and refuses to open (docs/storage.md).
      EXPECT_EQ(backend(), Backend::kRocksDb);
      EXPECT_TRUE(absl::IsDataLoss(reopened.status())) << reopened.status();
      return;
    }
    store_ = *std::move(reopened);
    std::vector<BlockData> out;
    bool found_damage = false;
    for (const TestBlock& block : failed) {
      status = store_->GetBlocks("victim", {block.id}, &out);
      if (status.ok()) {
        ExpectSameBlock(out[0], block);
      } else {
        EXPECT_TRUE(absl::IsDataLoss(status)) << status;
        found_damage = true;
      }
    }
    EXPECT_TRUE(found_damage) << "a flipped bit was served as good data";
    return;
  } else {
    EXPECT_FALSE(status.ok()) << "an injected " << FaultKindName(fault().kind) << " on "
                              << IoOperationName(fault().operation) << " was acknowledged";
    EXPECT_EQ(faults_.injected(), injected_before + 1);
    EXPECT_FALSE(status.message().empty());
    EXPECT_TRUE(absl::IsResourceExhausted(status) || absl::IsUnavailable(status)) << status;
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("injected fault"));
    maybe_applied.push_back(failed);
  }

  // The store keeps serving: the bystander reads and takes writes, the victim reads.
  ASSERT_NO_FATAL_FAILURE(ExpectState("bystander"));
  ASSERT_NO_FATAL_FAILURE(PutAcknowledged("bystander", NewBatch()));
  ASSERT_NO_FATAL_FAILURE(ExpectState("victim", maybe_applied));
  // And the victim takes writes again once the device recovers.
  ASSERT_NO_FATAL_FAILURE(PutAcknowledged("victim", NewBatch()));

  faults_.Clear();
  ASSERT_NO_FATAL_FAILURE(Reopen());
  ASSERT_NO_FATAL_FAILURE(ExpectState("victim"));
  ASSERT_NO_FATAL_FAILURE(ExpectState("bystander"));
}

// Faults that fail the call (not bit flips, which "succeed"), kept up until cleared.
using PersistentFaultTest = FaultInjectionTest;

TEST_P(PersistentFaultTest, PersistentFaultFailsEveryWriteCleanlyAndReadsGoOn) {
  ASSERT_TRUE(store_->PutSequence("victim", "profile").ok());
  PutAcknowledged("victim", NewBatch());
  // Every write (or fsync) of the data files fails until the device is "repaired".
  faults_.Arm({fault().operation, fault().kind, 1, 0, DataFileSuffix(backend())});
  std::vector<std::vector<TestBlock>> failed;
  for (int attempt = 0; attempt < 3; ++attempt) {
    failed.push_back(NewBatch());
    const absl::Status status = store_->PutBlocks("victim", Writes(failed.back()));
    EXPECT_TRUE(absl::IsResourceExhausted(status) || absl::IsUnavailable(status)) << status;
    ASSERT_NO_FATAL_FAILURE(ExpectState("victim", failed));
  }
  faults_.Clear();
  ASSERT_NO_FATAL_FAILURE(PutAcknowledged("victim", NewBatch()));
  ASSERT_NO_FATAL_FAILURE(Reopen());
  ASSERT_NO_FATAL_FAILURE(ExpectState("victim"));
}

// Writers on several sequences while WAL writes fail now and then: every failure makes the
// RocksDB store resume or reopen its DB and rebuild its catalog under the others' feet. Each
// writer must see clean errors only, read its own acknowledged writes back, and find them again
// after a reopen; nothing may deadlock.
TEST(RocksDbFaultRecoveryTest, ConcurrentWritersSurviveRepeatedReopens) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 12;
  const std::string dir = MakeTempDir();
  FaultInjector faults;
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(
      NewFaultInjectingFileSystem(rocksdb::FileSystem::Default(), &faults));
  absl::StatusOr<std::unique_ptr<BlockStore>> store = OpenRocksDbStoreWithEnv(dir, env.get());
  ASSERT_TRUE(store.ok()) << store.status();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE((*store)->PutSequence(absl::StrCat("writer-", t), "profile").ok());
  }
  for (uint64_t nth : {3, 9, 10, 17, 26, 31, 40}) {
    faults.Arm({IoOperation::kWrite, FaultKind::kIoError, nth, 1, ".log"});
  }
  // Per writer: the last acknowledged batch, and the batches that failed after it.
  std::vector<TestBlock> acknowledged[kThreads];
  std::vector<std::vector<TestBlock>> failed[kThreads];
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(300 + t);
      const std::string key = absl::StrCat("writer-", t);
      for (int round = 0; round < kRounds; ++round) {
        std::vector<TestBlock> batch = {RandomBlock({0, 0}, rng, 4096),
                                        RandomBlock({1, 0}, rng, 4096)};
        const absl::Status status = (*store)->PutBlocks(key, Writes(batch));
        if (!status.ok()) {
          EXPECT_TRUE(absl::IsUnavailable(status)) << status;
          errors.fetch_add(1);
          failed[t].push_back(std::move(batch));
          continue;
        }
        acknowledged[t] = batch;
        failed[t].clear();
        std::vector<BlockData> out;
        const absl::Status read = (*store)->GetBlocks(key, {BlockId{0, 0}, BlockId{1, 0}}, &out);
        ASSERT_TRUE(read.ok()) << read;
        ExpectSameBlock(out[0], batch[0]);
        ExpectSameBlock(out[1], batch[1]);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_GT(errors.load(), 0) << "no fault fired";
  faults.Clear();
  store->reset();
  store = OpenRocksDbStoreWithEnv(dir, env.get());
  ASSERT_TRUE(store.ok()) << store.status();
  for (int t = 0; t < kThreads; ++t) {
    if (acknowledged[t].empty()) continue;
    std::vector<BlockData> out;
    const absl::Status read =
        (*store)->GetBlocks(absl::StrCat("writer-", t), {BlockId{0, 0}, BlockId{1, 0}}, &out);
    ASSERT_TRUE(read.ok()) << read;
    const std::vector<TestBlock>* want = &acknowledged[t];
    for (const std::vector<TestBlock>& batch : failed[t]) {
      if (out[0].key == batch[0].key) want = &batch;
    }
    ExpectSameBlock(out[0], (*want)[0]);
    ExpectSameBlock(out[1], (*want)[1]);
  }
}

const FaultCase kFaultCases[] = {
    {"NoSpaceOnWrite", IoOperation::kWrite, FaultKind::kNoSpace},
    {"IoErrorOnWrite", IoOperation::kWrite, FaultKind::kIoError},
    {"ShortWrite", IoOperation::kWrite, FaultKind::kShortWrite},
    {"FsyncFails", IoOperation::kSync, FaultKind::kIoError},
    {"BitFlipOnWrite", IoOperation::kWrite, FaultKind::kBitFlip},
    {"BitFlipOnRead", IoOperation::kRead, FaultKind::kBitFlip},
};

const FaultCase kFailingFaultCases[] = {
    {"NoSpaceOnWrite", IoOperation::kWrite, FaultKind::kNoSpace},
    {"IoErrorOnWrite", IoOperation::kWrite, FaultKind::kIoError},
    {"ShortWrite", IoOperation::kWrite, FaultKind::kShortWrite},
    {"FsyncFails", IoOperation::kSync, FaultKind::kIoError},
};

INSTANTIATE_TEST_SUITE_P(
    Faults, FaultInjectionTest,
    ::testing::Combine(::testing::Values(Backend::kRocksDb, Backend::kPosixDir),
                       ::testing::ValuesIn(kFaultCases)),
    [](const auto& info) {
      return absl::StrCat(std::get<0>(info.param) == Backend::kRocksDb ? "RocksDb" : "PosixDir",
                          std::get<1>(info.param).name);
    });

INSTANTIATE_TEST_SUITE_P(
    PersistentFaults, PersistentFaultTest,
    ::testing::Combine(::testing::Values(Backend::kRocksDb, Backend::kPosixDir),
                       ::testing::ValuesIn(kFailingFaultCases)),
    [](const auto& info) {
      return absl::StrCat(std::get<0>(info.param) == Backend::kRocksDb ? "RocksDb" : "PosixDir",
                          std::get<1>(info.param).name);
    });

// The injector itself: per-operation, per-N-th-call, path-filtered, counted.
TEST(FaultInjectorTest, FaultsTheNthMatchingCallForCountCalls) {
  FaultInjector faults;
  faults.Arm({IoOperation::kSync, FaultKind::kIoError, 2, 2, ".seg"});
  EXPECT_FALSE(faults.Next(IoOperation::kSync, "a.seg").has_value());        // 1st
  EXPECT_FALSE(faults.Next(IoOperation::kSync, "meta").has_value());         // not matching
  EXPECT_FALSE(faults.Next(IoOperation::kWrite, "a.seg").has_value());       // other operation
  EXPECT_EQ(faults.Next(IoOperation::kSync, "b.seg"), FaultKind::kIoError);  // 2nd
  EXPECT_EQ(faults.Next(IoOperation::kSync, "c.seg"), FaultKind::kIoError);  // 3rd
  EXPECT_FALSE(faults.Next(IoOperation::kSync, "d.seg").has_value());        // 4th: past count
  EXPECT_EQ(faults.injected(), 2u);
  EXPECT_EQ(faults.calls(IoOperation::kSync), 5u);
  faults.Arm({IoOperation::kRead, FaultKind::kBitFlip, 1, 0, ""});
  for (int i = 0; i < 3; ++i) EXPECT_EQ(faults.Next(IoOperation::kRead, "x"), FaultKind::kBitFlip);
  faults.Clear();
  EXPECT_FALSE(faults.Next(IoOperation::kRead, "x").has_value());
}

}  // namespace
}  // namespace kvstar::storage
