// Bearer tokens and tenants against the real kvstar_server: calls without valid credentials are
// UNAUTHENTICATED and change nothing; each tenant sees only its own sequences, across restarts.
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kTokenA[] = "token-of-tenant-a-0123456789";
constexpr char kTokenB[] = "token-of-tenant-b-9876543210";
constexpr uint64_t kKeyBytes = 128 * 2 * 64 * 2;

v1::ModelProfile Profile(uint32_t layers) {
  v1::ModelProfile profile;
  profile.set_num_layers(layers);
  profile.set_num_q_heads(4);
  profile.set_num_kv_heads(2);
  profile.set_head_dim(64);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = MakeTempDir("auth");
    const std::string tokens = dir + "/tokens";
    std::ofstream(tokens) << "# token tenant\n" << kTokenA << " alpha\n" << kTokenB << " beta\n";
    server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
        "--data_dir=" + dir + "/data", "--auth_tokens_file=" + tokens, "--log_level=warn"});
    ASSERT_TRUE(server_->Start().ok());
  }

  // A context carrying `token` (none when empty).
  static std::unique_ptr<grpc::ClientContext> As(const std::string& token) {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
    return context;
  }

  grpc::Status Create(const std::string& token, const std::string& id, uint32_t layers) {
    v1::CreateSequenceRequest request;
    request.set_sequence_id(id);
    *request.mutable_profile() = Profile(layers);
    v1::CreateSequenceResponse response;
    return server_->stub().CreateSequence(As(token).get(), request, &response);
  }

  grpc::Status Put(const std::string& token, const std::string& id, uint64_t seed) {
    auto context = As(token);
    v1::PutBlocksResponse response;
    auto writer = server_->stub().PutBlocks(context.get(), &response);
    v1::PutBlocksRequest message;
    message.set_sequence_id(id);
    *message.add_blocks() = MakeBlock(seed, 0, 0, kKeyBytes);
    writer->Write(message);
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Get(const std::string& token, const std::string& id, std::string* key) {
    auto context = As(token);
    v1::GetBlocksRequest request;
    request.set_sequence_id(id);
    auto reader = server_->stub().GetBlocks(context.get(), request);
    v1::GetBlocksResponse reply;
    while (reader->Read(&reply)) {
      if (reply.blocks_size() > 0) *key = reply.blocks(0).key();
    }
    return reader->Finish();
  }

  std::unique_ptr<ServerProcess> server_;
};

TEST_F(AuthTest, CallsWithoutValidCredentialsAreUnauthenticatedAndChangeNothing) {
  for (const std::string token : {std::string(), std::string("not-a-known-token-at-all")}) {
    grpc::Status status = Create(token, "s", 2);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_THAT(status.error_message(),
                HasSubstr(token.empty() ? "missing" : "unknown bearer token"));
    EXPECT_EQ(Put(token, "s", 1).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    v1::StatsResponse stats;
    EXPECT_EQ(server_->stub().Stats(As(token).get(), v1::StatsRequest(), &stats).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  v1::StatsResponse stats;
  ASSERT_TRUE(server_->stub().Stats(As(kTokenA).get(), v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.sequences(), 0u);
}

TEST_F(AuthTest, TenantsSeeOnlyTheirOwnSequencesAcrossRestarts) {
  // The same id in two tenants: different sequences, even with different profiles.
  ASSERT_TRUE(Create(kTokenA, "shared-id", 2).ok());
  ASSERT_TRUE(Create(kTokenB, "shared-id", 3).ok());
  ASSERT_TRUE(Put(kTokenA, "shared-id", 1).ok());
  ASSERT_TRUE(Put(kTokenB, "shared-id", 2).ok());
  ASSERT_TRUE(Create(kTokenA, "only-a", 2).ok());

  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_TRUE(server_->Start().ok());

  std::string key;
  ASSERT_TRUE(Get(kTokenA, "shared-id", &key).ok());
  EXPECT_TRUE(key == MakeBlock(1, 0, 0, kKeyBytes).key());
  ASSERT_TRUE(Get(kTokenB, "shared-id", &key).ok());
  EXPECT_TRUE(key == MakeBlock(2, 0, 0, kKeyBytes).key());
  grpc::Status status = Get(kTokenB, "only-a", &key);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("only-a is not stored"));

  v1::DropSequenceRequest drop;
  drop.set_sequence_id("only-a");
  v1::DropSequenceResponse dropped;
  EXPECT_EQ(server_->stub().DropSequence(As(kTokenB).get(), drop, &dropped).error_code(),
            grpc::StatusCode::NOT_FOUND);
  drop.set_sequence_id("shared-id");
  ASSERT_TRUE(server_->stub().DropSequence(As(kTokenA).get(), drop, &dropped).ok());
  EXPECT_TRUE(Get(kTokenB, "shared-id", &key).ok()) << "tenant B's sequence went with A's";
}

}  // namespace
}  // namespace kvstar::testing
