// kvstarctl against the real kvstar_server with two tenants and an admin tenant: what each one
// sees (text and --json), inspect and drop, and its exit codes for errors.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kAlpha[] = "alpha-token-0123456789";
constexpr char kBeta[] = "beta-token-0123456789";
constexpr char kOps[] = "ops-token-0123456789";
constexpr uint64_t kKeyBytes = 128 * 2 * 64 * 2;

std::string KvstarctlBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr && workspace != nullptr) {
    return absl::StrCat(srcdir, "/", workspace, "/tools/kvstarctl");
  }
  return "bazel-bin/tools/kvstarctl";
}

struct CtlRun {
  int exit_code = -1;
  std::string out;  // stdout, then stderr
};

CtlRun Kvstarctl(const std::vector<std::string>& args) {
  const std::string command =
      absl::StrCat(KvstarctlBinary(), " ", absl::StrJoin(args, " "), " 2>&1");
  CtlRun run;
  FILE* pipe = popen(command.c_str(), "r");
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) run.out.append(buffer, n);
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

class KvstarctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = MakeTempDir("kvstarctl");
    std::ofstream(dir + "/tokens") << kAlpha << " alpha\n"
                                   << kBeta << " beta\n"
                                   << kOps << " ops\n";
    server_ = std::make_unique<ServerProcess>(
        std::vector<std::string>{"--data_dir=" + dir + "/data", "--log_level=warn",
                                 "--auth_tokens_file=" + dir + "/tokens", "--admin_tenant=ops"});
    ASSERT_TRUE(server_->Start().ok());
    ASSERT_NO_FATAL_FAILURE(Store(kAlpha, "alpha-seq", 3));
    ASSERT_NO_FATAL_FAILURE(Store(kBeta, "beta-secret", 5));
  }

  // Creates a 2-layer sequence and stores `blocks` blocks in each layer.
  void Store(const std::string& token, const std::string& id, uint32_t blocks) {
    v1::CreateSequenceRequest create;
    create.set_sequence_id(id);
    v1::ModelProfile* profile = create.mutable_profile();
    profile->set_num_layers(2);
    profile->set_num_q_heads(4);
    profile->set_num_kv_heads(2);
    profile->set_head_dim(64);
    profile->set_dtype(v1::DTYPE_BF16);
    grpc::ClientContext context;
    context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    v1::CreateSequenceResponse created;
    ASSERT_TRUE(server_->stub().CreateSequence(&context, create, &created).ok());
    grpc::ClientContext put_context;
    put_context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    v1::PutBlocksResponse response;
    auto writer = server_->stub().PutBlocks(&put_context, &response);
    v1::PutBlocksRequest message;
    message.set_sequence_id(id);
    for (uint32_t layer = 0; layer < 2; ++layer) {
      for (uint32_t index = 0; index < blocks; ++index) {
        *message.add_blocks() = MakeBlock(17, layer, index, kKeyBytes);
      }
    }
    ASSERT_TRUE(writer->Write(message));
    writer->WritesDone();
    ASSERT_TRUE(writer->Finish().ok());
  }

  std::vector<std::string> As(const std::string& token, std::vector<std::string> args) {
    args.insert(args.begin(), {"--address=" + server_->address(), absl::StrCat("--token=", token)});
    return args;
  }

  std::unique_ptr<ServerProcess> server_;
};

TEST_F(KvstarctlTest, HealthSaysServing) {
  CtlRun run = Kvstarctl(As(kAlpha, {"health"}));
  EXPECT_EQ(run.exit_code, 0) << run.out;
  EXPECT_EQ(run.out, "SERVING\n");
  run = Kvstarctl(As(kAlpha, {"--json", "health"}));
  EXPECT_EQ(run.out, "{\"status\":\"SERVING\"}\n");
}

TEST_F(KvstarctlTest, StatsAreTheTenantsOwnAndTheAdminSeesTheNode) {
  CtlRun alpha = Kvstarctl(As(kAlpha, {"--json", "stats"}));
  ASSERT_EQ(alpha.exit_code, 0) << alpha.out;
  EXPECT_THAT(alpha.out, HasSubstr("\"scope\":\"tenant\""));
  EXPECT_THAT(alpha.out, HasSubstr("\"sequences\":1,"));
  EXPECT_THAT(alpha.out, HasSubstr("\"blocks_put\":6,"));
  EXPECT_THAT(alpha.out, HasSubstr("\"tiers\":[]"));
  CtlRun ops = Kvstarctl(As(kOps, {"--json", "stats"}));
  ASSERT_EQ(ops.exit_code, 0) << ops.out;
  EXPECT_THAT(ops.out, HasSubstr("\"scope\":\"node\""));
  EXPECT_THAT(ops.out, HasSubstr("\"sequences\":2,"));
  EXPECT_THAT(ops.out, HasSubstr("\"blocks_put\":16,"));
  EXPECT_THAT(ops.out, HasSubstr("\"name\":\"rocksdb\""));
  CtlRun text = Kvstarctl(As(kOps, {"stats"}));
  EXPECT_THAT(text.out, HasSubstr("scope: node\n"));
  EXPECT_THAT(text.out, HasSubstr("tier rocksdb"));
}

TEST_F(KvstarctlTest, SequencesAndInspectShowOnlyTheCallersTenant) {
  CtlRun listed = Kvstarctl(As(kAlpha, {"sequences", "--details"}));
  ASSERT_EQ(listed.exit_code, 0) << listed.out;
  EXPECT_THAT(listed.out, HasSubstr("1 sequences\n"));
  EXPECT_THAT(listed.out, HasSubstr("alpha-seq  2 layers, not sealed, 6 blocks, 384.0 KiB\n"));
  EXPECT_THAT(listed.out, HasSubstr("reading blocks of sequence 1/1"));
  EXPECT_THAT(listed.out, Not(HasSubstr("beta-secret")));
  CtlRun json = Kvstarctl(As(kAlpha, {"--json", "inspect", "alpha-seq"}));
  ASSERT_EQ(json.exit_code, 0) << json.out;
  EXPECT_THAT(json.out, HasSubstr("\"blocks_per_layer\":[3,3],\"bytes\":393216}"));
  EXPECT_THAT(json.out, HasSubstr("\"num_layers\":2"));
  EXPECT_THAT(json.out, HasSubstr("\"sealed\":false"));
  CtlRun text = Kvstarctl(As(kAlpha, {"inspect", "alpha-seq"}));
  EXPECT_THAT(text.out, HasSubstr("profile   2 layers, 4 q / 2 kv heads, head_dim 64"));
  EXPECT_THAT(text.out, HasSubstr("  layer   1  3 blocks\n"));
  CtlRun other = Kvstarctl(As(kAlpha, {"inspect", "beta-secret"}));
  EXPECT_EQ(other.exit_code, 1);
  EXPECT_THAT(other.out, HasSubstr("NOT_FOUND"));
}

TEST_F(KvstarctlTest, DropRemovesTheSequenceAndReportsItsBlocks) {
  CtlRun dropped = Kvstarctl(As(kBeta, {"drop", "beta-secret"}));
  ASSERT_EQ(dropped.exit_code, 0) << dropped.out;
  EXPECT_THAT(dropped.out, HasSubstr("dropping beta-secret ..."));
  EXPECT_THAT(dropped.out, HasSubstr("dropped beta-secret: 10 blocks in"));
  CtlRun listed = Kvstarctl(As(kBeta, {"--json", "sequences"}));
  EXPECT_EQ(listed.out, "{\"sequences\":[]}\n");
  EXPECT_EQ(Kvstarctl(As(kBeta, {"drop", "beta-secret"})).exit_code, 1);
}

// RocksDB releases a dropped sequence's space in the background: the admin's stats show the
// bytes still held (the 10 dropped blocks' K+V, until the compaction ran, then 0).
TEST_F(KvstarctlTest, StatsShowTheBytesADropHasNotReclaimedYet) {
  ASSERT_EQ(Kvstarctl(As(kBeta, {"drop", "beta-secret"})).exit_code, 0);
  const std::regex pending("\"name\":\"rocksdb\"[^}]*\"reclaim_pending_bytes\":([0-9]+)\\}");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::string value;
  do {
    CtlRun json = Kvstarctl(As(kOps, {"--json", "stats"}));
    ASSERT_EQ(json.exit_code, 0) << json.out;
    std::smatch match;
    ASSERT_TRUE(std::regex_search(json.out, match, pending)) << json.out;
    value = match[1];
    ASSERT_TRUE(value == "0" || value == std::to_string(10 * 2 * kKeyBytes)) << json.out;
  } while (value != "0" && std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(value, "0") << "the drop was not reclaimed within 60 s";
  CtlRun text = Kvstarctl(As(kOps, {"stats"}));
  EXPECT_THAT(text.out, HasSubstr(" evictions, 0 B reclaim pending\n"));
}

TEST_F(KvstarctlTest, BadCommandsAndUnreachableNodesExitNonZero) {
  EXPECT_EQ(Kvstarctl(As(kAlpha, {"frobnicate"})).exit_code, 2);
  EXPECT_EQ(Kvstarctl(As(kAlpha, {"inspect"})).exit_code, 2);
  CtlRun unauthenticated = Kvstarctl(As("wrong-token", {"sequences"}));
  EXPECT_EQ(unauthenticated.exit_code, 1);
  EXPECT_THAT(unauthenticated.out, HasSubstr("UNAUTHENTICATED"));
  CtlRun nowhere = Kvstarctl({"--address=127.0.0.1:1", "--timeout_ms=2000", "health"});
  EXPECT_EQ(nowhere.exit_code, 1);
  EXPECT_THAT(nowhere.out, HasSubstr("UNAVAILABLE"));
}

}  // namespace
}  // namespace kvstar::testing
