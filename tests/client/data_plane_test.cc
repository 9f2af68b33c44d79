// The co-located data plane against the real kvstar_server on a loopback port (host backend): the
// same decode flow with Retrieve's new blocks in the tenant's shared-memory segment and as gRPC
// bytes gives bit-identical slots, the client's counts match the server's, kAuto picks shared
// memory on this host and falls back to bytes without a segment, and a segment too small for a
// retrieval mixes both kinds of blocks.
#include <chrono>
#include <cstring>
#include <fstream>
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

constexpr uint32_t kStride = 4;

// One server, one client on it, one sealed sequence.
struct DecodeRun {
  ~DecodeRun() {
    client.reset();
    if (server != nullptr) server->Stop().IgnoreError();
  }
  std::unique_ptr<ServerProcess> server;
  std::unique_ptr<Client> client;
  Sequence* sequence = nullptr;
};

// K and V of every slot of `table`, in table order.
std::string TableBytes(const SlotTable& table) {
  std::string bytes;
  for (uint32_t i = 0; i < table.count; ++i) {
    const char* slot = static_cast<const char*>(table.slot_pool) +
                       uint64_t(table.host_slots[i]) * table.slot_bytes;
    bytes.append(slot, table.slot_bytes);
  }
  return bytes;
}

class DataPlaneTest : public ::testing::Test {
 protected:
  // A memory-backend server with a segment of `shared_memory_bytes` (0: none).
  std::unique_ptr<ServerProcess> StartServer(uint64_t shared_memory_bytes) {
    auto server = std::make_unique<ServerProcess>(std::vector<std::string>{
        "--backend=memory", "--data_dir=" + MakeTempDir("data_plane"), "--log_level=warn",
        absl::StrCat("--shared_memory_bytes=", shared_memory_bytes)});
    absl::Status started = server->Start();
    EXPECT_TRUE(started.ok()) << started;
    return started.ok() ? std::move(server) : nullptr;
  }

  std::unique_ptr<Client> ConnectTo(ServerProcess& server, DataPlane plane) {
    ClientOptions options;
    options.address = server.address();
    options.backend = BackendKind::kHost;
    options.rpc_timeout_ms = 10000;
    options.data_plane = plane;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  // Server, client and the prompt offloaded and sealed.
  void StartRun(uint64_t shared_memory_bytes, DataPlane plane, DecodeRun* run) {
    run->server = StartServer(shared_memory_bytes);
    ASSERT_NE(run->server, nullptr);
    grpc::ClientContext context;
    v1::ServerInfoResponse info;
    ASSERT_TRUE(run->server->stub().GetServerInfo(&context, v1::ServerInfoRequest(), &info).ok());
    ASSERT_EQ(info.shared_memory_bytes(), shared_memory_bytes)
        << "the server did not create its segment (see its log)";
    run->client = ConnectTo(*run->server, plane);
    ASSERT_NE(run->client, nullptr);
    absl::StatusOr<Sequence*> sequence = run->client->CreateSequence(
        "seq", SmallProfile(), SmallConfig(kStride), {0, kPromptBlocks + 16});
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    run->sequence = *sequence;
    ASSERT_TRUE(OffloadBlocks(run->sequence, 0, kPromptBlocks).ok());
    const std::string queries = MakeQueries(SmallProfile(), kStride, 3);
    absl::Status sealed = run->sequence->Seal(queries.data(), kStride, MemoryKind::kHost, nullptr);
    ASSERT_TRUE(sealed.ok()) << sealed;
  }

  // Decodes `steps` steps of both runs in lockstep with the same queries. At every step, each
  // layer's tables hold their blocks' bytes, and where both runs show the selection made at the
  // same step, the tables are equal and their slots bit-identical. Returns how many visible
  // switches (new selections, per layer) were compared.
  int DecodeInLockstep(DecodeRun& a, DecodeRun& b, int steps) {
    std::vector<int64_t> compared_step(kLayers, -1);
    int switches = 0;
    for (int step = 0; step < steps; ++step) {
      const std::string query = MakeQueries(SmallProfile(), 1, 1000 + step);
      for (uint32_t layer = 0; layer < kLayers; ++layer) {
        absl::StatusOr<SlotTable> table_a = a.sequence->Acquire(layer, nullptr);
        absl::StatusOr<SlotTable> table_b = b.sequence->Acquire(layer, nullptr);
        EXPECT_TRUE(table_a.ok() && table_b.ok());
        if (!table_a.ok() || !table_b.ok()) return switches;
        const uint64_t key_bytes = SmallProfile().block_key_bytes();
        ExpectTableHoldsBlocks(*table_a, key_bytes);
        ExpectTableHoldsBlocks(*table_b, key_bytes);
        if (table_a->selection_step == table_b->selection_step) {
          EXPECT_EQ(Blocks(*table_a), Blocks(*table_b))
              << "step " << step << " layer " << layer << " selection of step "
              << table_a->selection_step;
          EXPECT_TRUE(TableBytes(*table_a) == TableBytes(*table_b))
              << "slots differ at step " << step << " layer " << layer;
          if (static_cast<int64_t>(table_a->selection_step) != compared_step[layer]) {
            compared_step[layer] = static_cast<int64_t>(table_a->selection_step);
            ++switches;
          }
        }
        const char* row = query.data() + layer * SmallProfile().query_bytes();
        for (DecodeRun* run : {&a, &b}) {
          EXPECT_TRUE(run->sequence->RecordQuery(layer, row, MemoryKind::kHost, nullptr).ok());
          EXPECT_TRUE(run->sequence->Release(layer, nullptr).ok());
        }
      }
      for (DecodeRun* run : {&a, &b}) {
        absl::Status stepped = run->client->Step();
        EXPECT_TRUE(stepped.ok()) << stepped;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a decode step's time
    }
    return switches;
  }

  static v1::StatsResponse ServerStats(ServerProcess& server) {
    grpc::ClientContext context;
    v1::StatsResponse stats;
    EXPECT_TRUE(server.stub().Stats(&context, v1::StatsRequest(), &stats).ok());
    return stats;
  }
};

TEST_F(DataPlaneTest, SharedMemoryAndGrpcBytesGiveBitIdenticalSlotsAndMatchTheServersCounts) {
  DecodeRun shared, bytes;
  ASSERT_NO_FATAL_FAILURE(StartRun(uint64_t{64} << 20, DataPlane::kSharedMemory, &shared));
  ASSERT_NO_FATAL_FAILURE(StartRun(uint64_t{64} << 20, DataPlane::kGrpcBytes, &bytes));
  EXPECT_EQ(shared.client->data_plane(), DataPlane::kSharedMemory);
  EXPECT_EQ(bytes.client->data_plane(), DataPlane::kGrpcBytes);

  const int switches = DecodeInLockstep(shared, bytes, 10 * kStride);
  // The Seal selection and most of the 10 retrievals, on every layer.
  EXPECT_GE(switches, 6 * static_cast<int>(kLayers));
  EXPECT_GT(shared.sequence->stats().selections_published, 5u * kLayers);

  const ClientStats shared_stats = shared.client->stats();
  const v1::StatsResponse shared_server = ServerStats(*shared.server);
  EXPECT_GT(shared_stats.blocks_received_shared, 0u);
  EXPECT_EQ(shared_stats.blocks_received_bytes, 0u);  // the segment had room for all
  EXPECT_EQ(shared_server.blocks_sent_shared(), shared_stats.blocks_received_shared);
  EXPECT_EQ(shared_server.blocks_sent(), shared_stats.blocks_received_shared);
  // The server copied them into the segment, and says how long that took.
  EXPECT_GT(shared_server.retrieve_copy_micros(), 0u);
  EXPECT_LE(shared_server.retrieve_copy_micros() + shared_server.retrieve_send_micros(),
            shared_server.retrieve_micros());
  // Completed retrievals took time, and its parts are within the whole.
  EXPECT_GT(shared_stats.retrievals_completed, 0u);
  EXPECT_GT(shared_stats.retrieve_micros, 0u);
  EXPECT_GT(shared_stats.first_reply_micros, 0u);
  EXPECT_GT(shared_stats.load_micros, 0u);
  EXPECT_LE(shared_stats.first_reply_micros + shared_stats.segment_wait_micros +
                shared_stats.load_micros + shared_stats.call_end_micros,
            shared_stats.retrieve_micros);

  const ClientStats bytes_stats = bytes.client->stats();
  const v1::StatsResponse bytes_server = ServerStats(*bytes.server);
  EXPECT_EQ(bytes_stats.blocks_received_shared, 0u);
  EXPECT_EQ(bytes_server.blocks_sent_shared(), 0u);
  EXPECT_EQ(bytes_server.retrieve_copy_micros(), 0u);  // nothing went through a segment
  EXPECT_EQ(bytes_server.blocks_sent(), bytes_stats.blocks_received_bytes);
  // The same selections moved the same blocks.
  EXPECT_EQ(bytes_stats.blocks_received_bytes, shared_stats.blocks_received_shared);
}

TEST_F(DataPlaneTest, ASegmentTooSmallForARetrievalMixesSharedAndByteBlocksWithIdenticalSlots) {
  DecodeRun shared, bytes;
  // Room for 3 blocks (64 KiB of K + V each): retrievals that move more send the rest as bytes.
  constexpr uint64_t kTinySegment = 3 * 2 * 32768;
  ASSERT_NO_FATAL_FAILURE(StartRun(kTinySegment, DataPlane::kSharedMemory, &shared));
  ASSERT_NO_FATAL_FAILURE(StartRun(kTinySegment, DataPlane::kGrpcBytes, &bytes));
  const int switches = DecodeInLockstep(shared, bytes, 10 * kStride);
  EXPECT_GE(switches, 6 * static_cast<int>(kLayers));

  const ClientStats stats = shared.client->stats();
  const v1::StatsResponse server = ServerStats(*shared.server);
  EXPECT_GT(stats.blocks_received_shared, 0u);
  EXPECT_GT(stats.blocks_received_bytes, 0u);
  EXPECT_EQ(server.blocks_sent_shared(), stats.blocks_received_shared);
  EXPECT_EQ(server.blocks_sent(), stats.blocks_received_shared + stats.blocks_received_bytes);
}

TEST_F(DataPlaneTest, AutoPicksSharedMemoryAgainstAServerOnThisHost) {
  DecodeRun run;
  ASSERT_NO_FATAL_FAILURE(StartRun(uint64_t{64} << 20, DataPlane::kAuto, &run));
  EXPECT_EQ(run.client->data_plane(), DataPlane::kSharedMemory);
  for (int step = 0; step < 3 * static_cast<int>(kStride); ++step) {
    const std::string query = MakeQueries(SmallProfile(), 1, 1000 + step);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      absl::StatusOr<SlotTable> table = run.sequence->Acquire(layer, nullptr);
      ASSERT_TRUE(table.ok()) << table.status();
      ExpectTableHoldsBlocks(*table, SmallProfile().block_key_bytes());
      const char* row = query.data() + layer * SmallProfile().query_bytes();
      ASSERT_TRUE(run.sequence->RecordQuery(layer, row, MemoryKind::kHost, nullptr).ok());
      ASSERT_TRUE(run.sequence->Release(layer, nullptr).ok());
    }
    absl::Status stepped = run.client->Step();
    ASSERT_TRUE(stepped.ok()) << stepped;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GT(run.client->stats().blocks_received_shared, 0u);
  EXPECT_EQ(ServerStats(*run.server).blocks_sent_shared(),
            run.client->stats().blocks_received_shared);
}

// With tokens, each tenant's client receives its own tenant's segment (the handshake sends the
// client's bearer token) and decodes from it, shared-memory checksums checked.
TEST_F(DataPlaneTest, WithTokensEachTenantsClientDecodesFromItsOwnTenantsSegment) {
  const std::string dir = MakeTempDir("data_plane_auth");
  const std::string tokens = dir + "/tokens";
  const std::string token_a = "token-of-tenant-a-0123456789";
  const std::string token_b = "token-of-tenant-b-9876543210";
  std::ofstream(tokens) << token_a << " alpha\n" << token_b << " beta\n";
  ServerProcess server({"--backend=memory", "--data_dir=" + dir + "/data", "--log_level=warn",
                        "--auth_tokens_file=" + tokens, "--shared_memory_bytes=67108864"});
  ASSERT_TRUE(server.Start().ok());
  std::vector<std::unique_ptr<Client>> clients;
  std::vector<Sequence*> sequences;
  for (const std::string& token : {token_a, token_b}) {
    ClientOptions options;
    options.address = server.address();
    options.backend = BackendKind::kHost;
    options.rpc_timeout_ms = 10000;
    options.bearer_token = token;
    options.verify_shared_memory_checksums = true;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    absl::StatusOr<Sequence*> sequence = (*client)->CreateSequence(
        "seq", SmallProfile(), SmallConfig(kStride), {0, kPromptBlocks + 16});
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    EXPECT_EQ((*client)->data_plane(), DataPlane::kSharedMemory);
    ASSERT_TRUE(OffloadBlocks(*sequence, 0, kPromptBlocks).ok());
    const std::string queries = MakeQueries(SmallProfile(), kStride, 3);
    ASSERT_TRUE((*sequence)->Seal(queries.data(), kStride, MemoryKind::kHost, nullptr).ok());
    sequences.push_back(*sequence);
    clients.push_back(*std::move(client));
  }
  for (int step = 0; step < 3 * static_cast<int>(kStride); ++step) {
    const std::string query = MakeQueries(SmallProfile(), 1, 1000 + step);
    for (size_t i = 0; i < clients.size(); ++i) {
      for (uint32_t layer = 0; layer < kLayers; ++layer) {
        absl::StatusOr<SlotTable> table = sequences[i]->Acquire(layer, nullptr);
        ASSERT_TRUE(table.ok()) << table.status();
        ExpectTableHoldsBlocks(*table, SmallProfile().block_key_bytes());
        const char* row = query.data() + layer * SmallProfile().query_bytes();
        ASSERT_TRUE(sequences[i]->RecordQuery(layer, row, MemoryKind::kHost, nullptr).ok());
        ASSERT_TRUE(sequences[i]->Release(layer, nullptr).ok());
      }
      absl::Status stepped = clients[i]->Step();
      ASSERT_TRUE(stepped.ok()) << stepped;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const std::unique_ptr<Client>& client : clients) {
    EXPECT_GT(client->stats().blocks_received_shared, 0u);
    EXPECT_EQ(client->stats().blocks_received_bytes, 0u);
  }
  clients.clear();
  EXPECT_TRUE(server.Stop().ok());
}

TEST_F(DataPlaneTest, WithoutASegmentAutoFallsBackToBytesAndSharedMemoryFailsClearly) {
  std::unique_ptr<ServerProcess> server = StartServer(0);
  ASSERT_NE(server, nullptr);

  std::unique_ptr<Client> automatic = ConnectTo(*server, DataPlane::kAuto);
  ASSERT_NE(automatic, nullptr);
  EXPECT_EQ(automatic->data_plane(), DataPlane::kAuto);  // not chosen before CreateSequence
  ASSERT_TRUE(
      automatic->CreateSequence("auto", SmallProfile(), SmallConfig(kStride), {0, 64}).ok());
  EXPECT_EQ(automatic->data_plane(), DataPlane::kGrpcBytes);

  std::unique_ptr<Client> forced = ConnectTo(*server, DataPlane::kSharedMemory);
  ASSERT_NE(forced, nullptr);
  absl::StatusOr<Sequence*> sequence =
      forced->CreateSequence("forced", SmallProfile(), SmallConfig(kStride), {0, 64});
  EXPECT_EQ(sequence.status().code(), absl::StatusCode::kFailedPrecondition) << sequence.status();
  EXPECT_THAT(std::string(sequence.status().message()),
              ::testing::HasSubstr("exports no shared-memory segment"));
  EXPECT_EQ(forced->data_plane(), DataPlane::kAuto);
  automatic.reset();
  forced.reset();
  EXPECT_TRUE(server->Stop().ok());
}

}  // namespace
}  // namespace kvstar::testing
