// The client library against the real kvstar_server on a loopback port (host backend): offload and
// read-back of a 4K-token sequence, Seal/Retrieve end to end, error paths, and a server restart in
// the middle of decoding.
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstar/client.h"
#include "tests/client/client_test_util.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

class ClientServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_dir_ = MakeTempDir("client");
    server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
        "--backend=rocksdb", "--data_dir=" + data_dir_, "--log_level=warn"});
    ASSERT_TRUE(server_->Start().ok());
    ClientOptions options;
    options.address = server_->address();
    options.backend = BackendKind::kHost;
    options.rpc_timeout_ms = 10000;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }

  Sequence* Create(const std::string& id, uint32_t stride = 4) {
    absl::StatusOr<Sequence*> sequence =
        client_->CreateSequence(id, SmallProfile(), SmallConfig(stride), {0, kPromptBlocks + 16});
    EXPECT_TRUE(sequence.ok()) << sequence.status();
    return sequence.ok() ? *sequence : nullptr;
  }

  // Seals with deterministic prompt queries; skips the test on servers without retrieval.
  absl::Status Seal(Sequence* sequence) {
    const std::string queries = MakeQueries(SmallProfile(), sequence->config().retrieval_stride, 3);
    return sequence->Seal(queries.data(), sequence->config().retrieval_stride, MemoryKind::kHost,
                          nullptr);
  }

  // The prompt offloaded and sealed; leaves *sequence null and skips on servers without Seal.
  void CreateOffloadAndSeal(const std::string& id, Sequence** sequence) {
    Sequence* created = Create(id);
    ASSERT_NE(created, nullptr);
    ASSERT_TRUE(OffloadBlocks(created, 0, kPromptBlocks).ok());
    absl::Status sealed = Seal(created);
    if (sealed.code() == absl::StatusCode::kUnimplemented) {
      GTEST_SKIP() << "server answers Seal with UNIMPLEMENTED: " << sealed;
    }
    ASSERT_TRUE(sealed.ok()) << sealed;
    *sequence = created;
  }

  absl::Status DecodeStep(Sequence* sequence, uint64_t step) {
    const std::string query = MakeQueries(SmallProfile(), 1, 1000 + step);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      absl::StatusOr<SlotTable> table = sequence->Acquire(layer, nullptr);
      if (!table.ok()) return table.status();
      ExpectTableHoldsBlocks(*table, SmallProfile().block_key_bytes());
      const char* row = query.data() + layer * SmallProfile().query_bytes();
      if (auto s = sequence->RecordQuery(layer, row, MemoryKind::kHost, nullptr); !s.ok()) return s;
      if (auto s = sequence->Release(layer, nullptr); !s.ok()) return s;
    }
    return client_->Step();
  }

  v1::StatsResponse ServerStats() {
    grpc::ClientContext context;
    v1::StatsResponse stats;
    EXPECT_TRUE(server_->stub().Stats(&context, v1::StatsRequest(), &stats).ok());
    return stats;
  }

  std::string data_dir_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ClientServerTest, OffloadsA4kTokenSequenceThatReadsBackBitExact) {
  Sequence* sequence = Create("doc");
  ASSERT_NE(sequence, nullptr);
  ASSERT_TRUE(OffloadBlocks(sequence, 0, kPromptBlocks).ok());
  absl::Status flushed = sequence->Flush();
  ASSERT_TRUE(flushed.ok()) << flushed;
  EXPECT_EQ(sequence->stats().blocks_offloaded, kLayers * kPromptBlocks);

  grpc::ClientContext context;
  v1::GetBlocksRequest request;
  request.set_sequence_id("doc");
  auto reader = server_->stub().GetBlocks(&context, request);
  v1::GetBlocksResponse reply;
  uint64_t blocks = 0;
  while (reader->Read(&reply)) {
    for (const v1::Block& block : reply.blocks()) {
      const v1::Block expected =
          TestBlock(kSeed, block.layer(), block.block_index(), SmallProfile().block_key_bytes());
      ASSERT_EQ(block.checksum(), expected.checksum());
      ASSERT_TRUE(block.key() == expected.key() && block.value() == expected.value());
      ++blocks;
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(blocks, kLayers * kPromptBlocks);
  EXPECT_TRUE(client_->DropSequence("doc").ok());
  EXPECT_EQ(client_->DropSequence("doc").code(), absl::StatusCode::kNotFound);
}

// A server that authenticates: the client's bearer token selects the tenant; without one, every
// call fails UNAUTHENTICATED as a Status.
TEST(ClientAuthTest, BearerTokenAuthenticatesAgainstTheRealServer) {
  const std::string dir = MakeTempDir("client-auth");
  const std::string tokens = dir + "/tokens";
  std::ofstream(tokens) << "client-token-0123456789 engine\n";
  ServerProcess server(
      {"--data_dir=" + dir + "/data", "--auth_tokens_file=" + tokens, "--log_level=warn"});
  ASSERT_TRUE(server.Start().ok());
  for (const std::string token : {std::string(), std::string("client-token-0123456789")}) {
    ClientOptions options;
    options.address = server.address();
    options.backend = BackendKind::kHost;
    options.bearer_token = token;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    absl::StatusOr<Sequence*> sequence =
        (*client)->CreateSequence("authed", SmallProfile(), SmallConfig(4), {0, 64});
    if (token.empty()) {
      EXPECT_EQ(sequence.status().code(), absl::StatusCode::kUnauthenticated) << sequence.status();
      continue;
    }
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    const v1::Block block = TestBlock(kSeed, 0, 0, SmallProfile().block_key_bytes());
    ASSERT_TRUE(
        (*sequence)
            ->Offload(0, 0, block.key().data(), block.value().data(), MemoryKind::kHost, nullptr)
            .ok());
    EXPECT_TRUE((*sequence)->Flush().ok());
  }
}

TEST(ClientStagingTest, SealLoadsAFirstSelectionLargerThanTheStagingBudget) {
  const std::string dir = MakeTempDir("client-staging");
  ServerProcess server({"--data_dir=" + dir + "/data", "--log_level=warn"});
  ASSERT_TRUE(server.Start().ok());
  ClientOptions options;
  options.address = server.address();
  options.backend = BackendKind::kHost;
  // One layer's first selection (11 blocks of 64 KiB) fits; all four layers' (2.75 MiB) do not.
  options.staging_budget_bytes = 1 << 20;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<Sequence*> sequence =
      (*client)->CreateSequence("staged", SmallProfile(), SmallConfig(4), {0, kPromptBlocks + 16});
  ASSERT_TRUE(sequence.ok()) << sequence.status();
  ASSERT_TRUE(OffloadBlocks(*sequence, 0, kPromptBlocks).ok());
  const std::string queries = MakeQueries(SmallProfile(), 4, 3);
  std::future<absl::Status> sealed = std::async(std::launch::async, [&] {
    return (*sequence)->Seal(queries.data(), 4, MemoryKind::kHost, nullptr);
  });
  if (sealed.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
    ADD_FAILURE() << "Seal did not return within 60 s: its layers' staging waits on itself";
    std::_Exit(1);  // the blocked thread cannot be joined
  }
  absl::Status status = sealed.get();
  ASSERT_TRUE(status.ok()) << status;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    absl::StatusOr<SlotTable> table = (*sequence)->Acquire(layer, nullptr);
    ASSERT_TRUE(table.ok()) << table.status();
    EXPECT_GT(table->count, 3u);  // init + local windows and the selected middle blocks
    ExpectTableHoldsBlocks(*table, SmallProfile().block_key_bytes());
    ASSERT_TRUE((*sequence)->Release(layer, nullptr).ok());
  }
}

TEST_F(ClientServerTest, ServerErrorsComeBackAsStatuses) {
  // A different profile for an existing id.
  ASSERT_NE(Create("taken"), nullptr);
  ModelProfile other = SmallProfile();
  other.head_dim = 128;
  ClientOptions options;
  options.address = server_->address();
  options.backend = BackendKind::kHost;
  absl::StatusOr<std::unique_ptr<Client>> second = Client::Connect(options);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ((*second)->CreateSequence("taken", other, SmallConfig(), {0, 64}).status().code(),
            absl::StatusCode::kAlreadyExists);
  // Seal before the prompt is stored.
  Sequence* empty = Create("empty");
  ASSERT_NE(empty, nullptr);
  absl::Status sealed = Seal(empty);
  EXPECT_FALSE(sealed.ok());
  if (sealed.code() != absl::StatusCode::kUnimplemented) {
    EXPECT_EQ(sealed.code(), absl::StatusCode::kFailedPrecondition) << sealed;
  }
  // An unreachable server: a clean error, no hang beyond the deadline.
  options.address = "127.0.0.1:1";
  options.rpc_timeout_ms = 500;
  absl::StatusOr<std::unique_ptr<Client>> nowhere = Client::Connect(options);
  ASSERT_TRUE(nowhere.ok());
  EXPECT_FALSE((*nowhere)->CreateSequence("x", SmallProfile(), SmallConfig(), {0, 64}).ok());
}

TEST_F(ClientServerTest, SealAndRetrieveLoadOnlyNewBlocksAndKeepSlotsCorrect) {
  Sequence* sequence = nullptr;
  ASSERT_NO_FATAL_FAILURE(CreateOffloadAndSeal("decode", &sequence));
  if (sequence == nullptr) return;  // skipped
  // init 1 + local 2 + ceil(29 * 0.25) = 11 resident blocks per layer.
  absl::StatusOr<SlotTable> first = sequence->Acquire(0, nullptr);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->count, 11u);
  EXPECT_EQ(first->block_indices[0], 0u);
  EXPECT_EQ(first->block_indices[first->count - 1], kPromptBlocks - 1);
  ASSERT_TRUE(sequence->Release(0, nullptr).ok());

  const uint32_t stride = sequence->config().retrieval_stride;
  for (uint64_t step = 0; step < 64; ++step) {  // 16 retrievals at stride 4
    absl::Status stepped = DecodeStep(sequence, step);
    if (stepped.code() == absl::StatusCode::kUnimplemented) {
      GTEST_SKIP() << "server answers Retrieve with UNIMPLEMENTED: " << stepped;
    }
    ASSERT_TRUE(stepped.ok()) << stepped;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a decode step's time
  }
  const SequenceStats stats = sequence->stats();
  EXPECT_GE(client_->stats().retrievals_sent, 5u);
  EXPECT_GE(stats.selections_published, 5u * kLayers);
  EXPECT_LE(stats.max_staleness_steps, stride + 1);
  // Incremental transfer: most selected blocks were resident and not sent again.
  const v1::StatsResponse server = ServerStats();
  EXPECT_GT(server.blocks_skipped_held(), 0u);
  EXPECT_EQ(server.blocks_sent(), stats.blocks_loaded - kLayers * 11u);
  EXPECT_GT(server.blocks_sent(), 0u);  // selections moved
  EXPECT_GT(stats.blocks_already_resident, 0u);
}

TEST_F(ClientServerTest, ServerRestartMidDecodeGivesACleanErrorAndTheDocumentedRecoveryWorks) {
  Sequence* sequence = nullptr;
  ASSERT_NO_FATAL_FAILURE(CreateOffloadAndSeal("restart", &sequence));
  if (sequence == nullptr) return;  // skipped
  const uint32_t stride = sequence->config().retrieval_stride;
  uint64_t step = 0;
  for (; step < stride; ++step) ASSERT_TRUE(DecodeStep(sequence, step).ok());

  server_->Kill();
  // Decoding goes on from the resident set; the failed retrieval and offload come back as errors.
  absl::Status retrieval;
  for (int i = 0; i < 4 * static_cast<int>(stride) && retrieval.ok(); ++i, ++step) {
    retrieval = DecodeStep(sequence, step);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_FALSE(retrieval.ok());
  // The first decode block is queued; its failure may already be reported by the next Offload.
  absl::Status offloaded = OffloadBlocks(sequence, kPromptBlocks, 1);
  if (!offloaded.ok()) {
    EXPECT_EQ(offloaded.code(), absl::StatusCode::kUnavailable) << offloaded;
  }
  absl::Status flushed = sequence->Flush();
  EXPECT_FALSE(flushed.ok());
  EXPECT_THAT(std::string(flushed.message()), ::testing::HasSubstr("offload them again"));

  // Recovery: reconnect to the restarted server (new port), re-offload, reseal.
  ASSERT_TRUE(server_->Start().ok());
  ASSERT_TRUE(client_->Reconnect(server_->address()).ok());
  ASSERT_TRUE(OffloadBlocks(sequence, kPromptBlocks, 1).ok());
  ASSERT_TRUE(sequence->Flush().ok());
  absl::Status resealed = sequence->Reseal();
  ASSERT_TRUE(resealed.ok()) << resealed;
  const uint64_t published = sequence->stats().selections_published;
  for (int i = 0; i < 3 * static_cast<int>(stride); ++i, ++step) {
    absl::Status stepped = DecodeStep(sequence, step);
    ASSERT_TRUE(stepped.ok()) << stepped;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GT(sequence->stats().selections_published, published);
}

}  // namespace
}  // namespace kvstar::testing
