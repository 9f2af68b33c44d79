// The real kvstar_server under bounded resources: idle streams are ended after the idle timeout,
// streams and in-flight put bytes beyond their limits are refused naming the limit, and the
// health service reports NOT_SERVING exactly while the node cannot take work.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/client_unary_call.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

// 2 layers, 2 KV heads of dim 64, 128 tokens, bf16: 32 KiB of K per block, 64 KiB per block.
constexpr uint64_t kKeyBytes = 128 * 2 * 64 * 2;

v1::ModelProfile Profile() {
  v1::ModelProfile profile;
  profile.set_num_layers(2);
  profile.set_num_q_heads(2);
  profile.set_num_kv_heads(2);
  profile.set_head_dim(64);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

HealthStatus::ServingStatus Health(grpc::Channel& channel) {
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("kvstar.v1.KvStore");
  HealthStatus response;
  grpc::Status status = grpc::internal::BlockingUnaryCall(
      &channel,
      grpc::internal::RpcMethod("/grpc.health.v1.Health/Check",
                                grpc::internal::RpcMethod::NORMAL_RPC),
      &context, request, &response);
  return status.ok() ? response.status() : HealthStatus::UNKNOWN;
}

// Asks the health service until it reports `wanted` (each answer is the event itself: the node's
// state changes when the server has taken in what the test sent). False after 30 s.
bool AwaitHealth(grpc::Channel& channel, HealthStatus::ServingStatus wanted) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (Health(channel) == wanted) return true;
  }
  return false;
}

// An open PutBlocks stream that the test drives.
struct OpenPut {
  explicit OpenPut(v1::KvStore::Stub& stub) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    writer = stub.PutBlocks(&context, &response);
  }
  bool Send(const std::string& id, uint32_t layer, uint32_t first, uint32_t count) {
    v1::PutBlocksRequest message;
    message.set_sequence_id(id);
    for (uint32_t i = first; i < first + count; ++i) {
      *message.add_blocks() = MakeBlock(1, layer, i, kKeyBytes);
    }
    return writer->Write(message);
  }
  grpc::Status Close() {
    writer->WritesDone();
    return writer->Finish();
  }
  grpc::ClientContext context;
  v1::PutBlocksResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutBlocksRequest>> writer;
};

class LimitsTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> flags) {
    flags.push_back("--backend=memory");
    flags.push_back("--data_dir=" + MakeTempDir("limits"));
    flags.push_back("--log_level=warn");
    server_ = std::make_unique<ServerProcess>(flags);
    ASSERT_TRUE(server_->Start().ok());
    grpc::ClientContext context;
    v1::CreateSequenceRequest request;
    request.set_sequence_id("seq");
    *request.mutable_profile() = Profile();
    v1::CreateSequenceResponse response;
    ASSERT_TRUE(server_->stub().CreateSequence(&context, request, &response).ok());
  }
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(LimitsTest, AnIdlePutStreamIsEndedNamingTheIdleTimeout) {
  Start({"--stream_idle_timeout_ms=300"});
  OpenPut idle(server_->stub());
  // Sends nothing and never half-closes: the server ends it.
  grpc::Status status = idle.writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("--stream_idle_timeout_ms=300"));
  // A stream that keeps sending is not idle.
  OpenPut busy(server_->stub());
  ASSERT_TRUE(busy.Send("seq", 0, 0, 1));
  grpc::Status closed = busy.Close();
  EXPECT_TRUE(closed.ok()) << closed.error_message();
  EXPECT_EQ(busy.response.blocks_written(), 1u);
}

TEST_F(LimitsTest, StreamsBeyondTheLimitAreRefusedAndHealthFollowsTheLimit) {
  Start({"--max_open_streams=4", "--stream_idle_timeout_ms=0"});
  grpc::Channel& channel = *server_->channel();
  ASSERT_EQ(Health(channel), HealthStatus::SERVING);
  std::vector<std::unique_ptr<OpenPut>> open;
  for (int i = 0; i < 4; ++i) open.push_back(std::make_unique<OpenPut>(server_->stub()));
  ASSERT_TRUE(AwaitHealth(channel, HealthStatus::NOT_SERVING));

  OpenPut refused(server_->stub());
  grpc::Status status = refused.Close();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--max_open_streams=4"));
  // Unary calls are still answered while the streams are at their limit.
  grpc::ClientContext stats_context;
  v1::StatsResponse stats;
  EXPECT_TRUE(server_->stub().Stats(&stats_context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.sequences(), 1u);

  open[0]->context.TryCancel();
  ASSERT_TRUE(AwaitHealth(channel, HealthStatus::SERVING));
  OpenPut admitted(server_->stub());
  ASSERT_TRUE(admitted.Send("seq", 1, 0, 2));
  EXPECT_TRUE(admitted.Close().ok());
  for (size_t i = 1; i < open.size(); ++i) EXPECT_TRUE(open[i]->Close().ok());
}

TEST_F(LimitsTest, PutBytesBeyondTheInflightLimitAreRefusedNamingIt) {
  const uint64_t limit = 32 * 2 * kKeyBytes;  // 2 MiB: 32 blocks
  Start({absl::StrCat("--max_message_bytes=", 1 << 20),
         absl::StrCat("--max_inflight_put_bytes=", limit),
         absl::StrCat("--max_inflight_put_bytes_per_tenant=", limit)});
  grpc::Channel& channel = *server_->channel();
  // One stream holds exactly the limit, queued and not yet written (its batch is not full).
  OpenPut holder(server_->stub());
  for (uint32_t first = 0; first < 32; first += 8) ASSERT_TRUE(holder.Send("seq", 0, first, 8));
  ASSERT_TRUE(AwaitHealth(channel, HealthStatus::NOT_SERVING));

  OpenPut late(server_->stub());
  late.Send("seq", 1, 0, 1);
  grpc::Status status = late.Close();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("PutBlocks message 0"));
  EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat("--max_inflight_put_bytes=", limit)));

  // Once the holder's blocks are stored, the bytes are free again.
  grpc::Status held = holder.Close();
  ASSERT_TRUE(held.ok()) << held.error_message();
  EXPECT_EQ(holder.response.blocks_written(), 32u);
  ASSERT_TRUE(AwaitHealth(channel, HealthStatus::SERVING));
  OpenPut retry(server_->stub());
  ASSERT_TRUE(retry.Send("seq", 1, 0, 1));
  EXPECT_TRUE(retry.Close().ok());
}

TEST(LimitsFlagsTest, AnInflightLimitBelowTheLargestMessageIsRefusedAtStart) {
  ServerProcess server({"--backend=memory", "--data_dir=" + MakeTempDir("flags"),
                        absl::StrCat("--max_inflight_put_bytes=", 1 << 20)});
  absl::Status started = server.Start();
  EXPECT_FALSE(started.ok());
}

}  // namespace
}  // namespace kvstar::testing
