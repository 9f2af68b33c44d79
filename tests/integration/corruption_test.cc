// Corruption through the real server on both durable backends: a block whose stored bytes were
// damaged on disk reads back as DATA_LOSS (not NOT_FOUND, not wrong bytes), the other blocks read
// back intact, and Stats counts it; a damaged RocksDB write-ahead log stops the server at start.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kBlocks = 4;
constexpr uint64_t kSeed = 3;

v1::ModelProfile SmallProfile() {
  v1::ModelProfile profile;
  profile.set_num_layers(2);
  profile.set_num_q_heads(2);
  profile.set_num_kv_heads(2);
  profile.set_head_dim(64);
  profile.set_block_size(128);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

constexpr uint64_t kKeyBytes = 128 * 2 * 64 * 2;

std::vector<fs::path> FilesEndingWith(const std::string& dir, const std::string& suffix) {
  std::vector<fs::path> found;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file() && absl::EndsWith(entry.path().string(), suffix)) {
      found.push_back(entry.path());
    }
  }
  return found;
}

void FlipByte(const fs::path& path, uint64_t offset) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(file.good()) << path;
  file.seekg(static_cast<std::streamoff>(offset));
  char byte = 0;
  file.get(byte);
  file.seekp(static_cast<std::streamoff>(offset));
  file.put(static_cast<char>(byte ^ 0x5a));
}

class CorruptionTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    data_dir_ = MakeTempDir(GetParam());
    server_ = std::make_unique<ServerProcess>(
        std::vector<std::string>{"--backend=" + GetParam(), "--data_dir=" + data_dir_,
                                 "--dram_budget_bytes=0", "--log_level=warn"});
    ASSERT_TRUE(server_->Start().ok());
  }

  // One sequence with kBlocks blocks of layer 0, in one PutBlocks message.
  void PutSequence() {
    grpc::ClientContext create_context;
    v1::CreateSequenceRequest create;
    create.set_sequence_id("seq");
    *create.mutable_profile() = SmallProfile();
    v1::CreateSequenceResponse created;
    ASSERT_TRUE(server_->stub().CreateSequence(&create_context, create, &created).ok());
    grpc::ClientContext put_context;
    v1::PutBlocksResponse put;
    auto writer = server_->stub().PutBlocks(&put_context, &put);
    v1::PutBlocksRequest message;
    message.set_sequence_id("seq");
    for (uint32_t index = 0; index < kBlocks; ++index) {
      *message.add_blocks() = MakeBlock(kSeed, 0, index, kKeyBytes);
    }
    ASSERT_TRUE(writer->Write(message));
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  grpc::Status GetBlock(uint32_t index, v1::Block* block) {
    grpc::ClientContext context;
    v1::GetBlocksRequest request;
    request.set_sequence_id("seq");
    v1::BlockRef* ref = request.add_blocks();
    ref->set_layer(0);
    ref->set_block_index(index);
    auto reader = server_->stub().GetBlocks(&context, request);
    v1::GetBlocksResponse reply;
    while (reader->Read(&reply)) {
      if (reply.blocks_size() > 0) *block = reply.blocks(0);
    }
    return reader->Finish();
  }

  uint64_t CorruptBlocksInStats() {
    grpc::ClientContext context;
    v1::StatsResponse stats;
    EXPECT_TRUE(server_->stub().Stats(&context, v1::StatsRequest(), &stats).ok());
    return stats.corrupt_blocks();
  }

  std::string data_dir_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_P(CorruptionTest, DamagedBlockIsDataLossOthersIntactAndStatsCountIt) {
  PutSequence();
  ASSERT_TRUE(server_->Stop().ok());
  if (GetParam() == "rocksdb") {
    // A restart replays the WAL into a table file, where the damage goes.
    ASSERT_TRUE(server_->Start().ok());
    ASSERT_TRUE(server_->Stop().ok());
    const std::vector<fs::path> tables = FilesEndingWith(data_dir_, ".sst");
    ASSERT_EQ(tables.size(), 1u);
    FlipByte(tables[0], fs::file_size(tables[0]) / 2);
  } else {
    const std::vector<fs::path> segments = FilesEndingWith(data_dir_, ".seg");
    ASSERT_EQ(segments.size(), 1u);
    FlipByte(segments[0], kKeyBytes / 2);  // inside block 0's K
  }
  ASSERT_TRUE(server_->Start().ok());
  EXPECT_EQ(CorruptBlocksInStats(), 0u);

  int damaged = 0;
  for (uint32_t index = 0; index < kBlocks; ++index) {
    v1::Block block;
    const grpc::Status status = GetBlock(index, &block);
    if (status.ok()) {
      const v1::Block expected = MakeBlock(kSeed, 0, index, kKeyBytes);
      EXPECT_TRUE(block.key() == expected.key() && block.value() == expected.value())
          << "block " << index;
      continue;
    }
    ++damaged;
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), absl::StrCat("index ", index)))
        << status.error_message();
  }
  EXPECT_EQ(damaged, 1);
  EXPECT_EQ(CorruptBlocksInStats(), 1u);
}

// Only RocksDB has a write-ahead log.
using RocksDbWalTest = CorruptionTest;

TEST_P(RocksDbWalTest, DamagedRocksDbWalStopsTheServerAtStart) {
  PutSequence();
  ASSERT_TRUE(server_->Stop().ok());
  const std::vector<fs::path> logs = FilesEndingWith(data_dir_, ".log");
  ASSERT_EQ(logs.size(), 1u);
  ASSERT_GT(fs::file_size(logs[0]), 2 * kKeyBytes);
  FlipByte(logs[0], fs::file_size(logs[0]) / 2);
  const absl::Status started = server_->Start();
  EXPECT_FALSE(started.ok()) << "the server served a store whose WAL is damaged";
  EXPECT_TRUE(absl::StrContains(started.message(), "exited during start-up")) << started;
}

INSTANTIATE_TEST_SUITE_P(Backends, CorruptionTest, ::testing::Values("rocksdb", "nfs"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Backends, RocksDbWalTest, ::testing::Values("rocksdb"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvstar::testing
