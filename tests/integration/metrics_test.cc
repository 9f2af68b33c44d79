// The Prometheus endpoint of the real kvstar_server, scraped over HTTP while RPCs run: counts by
// method and code, latency histograms, open streams, tier contents and sequences per tenant.
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kKeyBytes = 128 * 2 * 64 * 2;

// A loopback port that was free a moment ago.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  const int port = ntohs(address.sin_port);
  close(fd);
  return port;
}

std::string Scrape(int port) {
  httplib::Client http("127.0.0.1", port);
  httplib::Result got = http.Get("/metrics");
  if (!got || got->status != 200) return "";
  return got->body;
}

TEST(MetricsEndpointTest, ScrapeShowsWhatTheServerDid) {
  const int metrics_port = FreePort();
  const std::string dir = MakeTempDir("metrics");
  ServerProcess server({"--data_dir=" + dir + "/data", "--log_level=warn",
                        absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port)});
  ASSERT_TRUE(server.Start().ok());

  v1::CreateSequenceRequest create;
  create.set_sequence_id("scraped");
  v1::ModelProfile* profile = create.mutable_profile();
  profile->set_num_layers(1);
  profile->set_num_q_heads(4);
  profile->set_num_kv_heads(2);
  profile->set_head_dim(64);
  profile->set_dtype(v1::DTYPE_BF16);
  v1::CreateSequenceResponse created;
  grpc::ClientContext create_context;
  ASSERT_TRUE(server.stub().CreateSequence(&create_context, create, &created).ok());

  {
    grpc::ClientContext context;
    v1::PutBlocksResponse response;
    auto writer = server.stub().PutBlocks(&context, &response);
    v1::PutBlocksRequest message;
    message.set_sequence_id("scraped");
    *message.add_blocks() = MakeBlock(7, 0, 0, kKeyBytes);
    ASSERT_TRUE(writer->Write(message));
    writer->WritesDone();
    ASSERT_TRUE(writer->Finish().ok());
  }
  for (int i = 0; i < 2; ++i) {  // NOT_FOUND twice
    grpc::ClientContext context;
    v1::DropSequenceRequest drop;
    drop.set_sequence_id("never-created");
    v1::DropSequenceResponse dropped;
    EXPECT_EQ(server.stub().DropSequence(&context, drop, &dropped).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  // A stream left open while scraping.
  grpc::ClientContext open_context;
  v1::PutBlocksResponse open_response;
  auto open_writer = server.stub().PutBlocks(&open_context, &open_response);
  v1::PutBlocksRequest first;
  first.set_sequence_id("scraped");
  *first.add_blocks() = MakeBlock(7, 0, 1, kKeyBytes);
  ASSERT_TRUE(open_writer->Write(first));

  // Write returns once the message is on its way: the server may not have started the call
  // yet, so scrape until it shows (or 10 s passed, and the expectation below fails).
  const std::string open_stream = "kvstar_rpc_in_flight{method=\"PutBlocks\"} 1\n";
  std::string text = Scrape(metrics_port);
  for (int i = 0; i < 100 && text.find(open_stream) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    text = Scrape(metrics_port);
  }
  ASSERT_FALSE(text.empty()) << "no answer at 127.0.0.1:" << metrics_port << "/metrics";
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"CreateSequence\",code=\"OK\"} "
                              "1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"PutBlocks\",code=\"OK\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"DropSequence\",code=\"NOT_"
                              "FOUND\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_latency_seconds_count{method=\"CreateSequence\"} 1\n"));
  EXPECT_THAT(text, HasSubstr(open_stream));
  EXPECT_THAT(text, HasSubstr("kvstar_blocks_put_total 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_blocks{tier=\"rocksdb\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tenant_sequences{tenant=\"default\"} 1\n"));

  open_writer->WritesDone();
  EXPECT_TRUE(open_writer->Finish().ok());
  text = Scrape(metrics_port);
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_in_flight{method=\"PutBlocks\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"PutBlocks\",code=\"OK\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_blocks_put_total 2\n"));
  EXPECT_TRUE(server.Stop().ok());
}

TEST(RpcLogTest, EachRpcGetsARequestIdAndOneEscapedKeyValueLine) {
  const std::string dir = MakeTempDir("rpclog");
  ServerProcess server({"--data_dir=" + dir + "/data", "--log_level=debug"});
  server.LogTo(dir + "/server.log");
  ASSERT_TRUE(server.Start().ok());
  std::string request_ids;
  for (const std::string& id : {std::string("missing seq"), std::string("forged\nevent=fake")}) {
    grpc::ClientContext context;
    v1::DropSequenceRequest drop;
    drop.set_sequence_id(id);
    v1::DropSequenceResponse dropped;
    EXPECT_FALSE(server.stub().DropSequence(&context, drop, &dropped).ok());
    auto found = context.GetServerInitialMetadata().find("kvstar-request-id");
    ASSERT_NE(found, context.GetServerInitialMetadata().end());
    request_ids += std::string(found->second.data(), found->second.size()) + " ";
  }
  {
    // PutBlocks is registered raw: the line still names the sequence of its first message.
    grpc::ClientContext context;
    v1::PutBlocksResponse put;
    auto writer = server.stub().PutBlocks(&context, &put);
    v1::PutBlocksRequest message;
    message.set_sequence_id("missing put");
    message.add_blocks()->set_key("k");
    writer->Write(message);
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  ASSERT_TRUE(server.Stop().ok());
  std::ifstream in(dir + "/server.log");
  std::vector<std::string> rpc_lines;
  std::string log;
  for (std::string line; std::getline(in, line);) {
    log += line + "\n";
    if (line.find("event=rpc ") != std::string::npos) rpc_lines.push_back(line);
  }
  ASSERT_EQ(rpc_lines.size(), 3u) << "request ids " << request_ids << ", log:\n" << log;
  EXPECT_THAT(rpc_lines[0], HasSubstr("method=DropSequence code=NOT_FOUND duration_ms="));
  EXPECT_THAT(rpc_lines[0], HasSubstr(" sequence_id=\"missing seq\""));
  EXPECT_THAT(rpc_lines[0], HasSubstr(" peer=ipv4:127.0.0.1:"));
  // The newline stays escaped: one line, no forged event.
  EXPECT_THAT(rpc_lines[1], HasSubstr("sequence_id=\"forged\\x0aevent=fake\""));
  EXPECT_THAT(rpc_lines[2], HasSubstr("method=PutBlocks code=NOT_FOUND duration_ms="));
  EXPECT_THAT(rpc_lines[2], HasSubstr(" sequence_id=\"missing put\""));
  const std::string first_id = request_ids.substr(0, request_ids.find(' '));
  EXPECT_THAT(rpc_lines[0], HasSubstr("request_id=" + first_id + " "));
}

TEST(MetricsEndpointTest, UnusableAddressStopsTheServerAtStart) {
  ServerProcess server({"--data_dir=" + MakeTempDir("metrics-bad") + "/data", "--log_level=error",
                        "--metrics_listen=not-an-address"});
  EXPECT_FALSE(server.Start().ok());
}

}  // namespace
}  // namespace kvstar::testing
