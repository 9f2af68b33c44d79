// Metrics: the text exposition of RPC counts, latency histograms, in-flight RPCs and the node's
// Stats, and its HTTP endpoint.
#include "server/metrics.h"

#include <httplib.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/log_value.h"

namespace kvstar::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

NodeStats SomeStats() {
  NodeStats stats;
  stats.sequences = 3;
  stats.blocks_put = 40;
  stats.blocks_sent = 7;
  stats.blocks_skipped_held = 5;
  storage::TierStats dram;
  dram.name = "dram";
  dram.blocks = 10;
  dram.bytes = 4096;
  dram.hits = 3;
  dram.misses = 1;
  stats.tiers.push_back(dram);
  storage::TierStats rocksdb;
  rocksdb.name = "rocksdb";
  rocksdb.reclaim_pending_bytes = 8192;
  stats.tiers.push_back(rocksdb);
  return stats;
}

TEST(MetricsTest, RpcCountsAndHistogramsAreCumulative) {
  Metrics metrics({});
  metrics.RpcStarted("Retrieve");
  metrics.RpcFinished("Retrieve", 0, 0.0004);  // bucket le=0.0005
  metrics.RpcStarted("Retrieve");
  metrics.RpcFinished("Retrieve", 0, 2.0);  // bucket le=5
  metrics.RpcStarted("Retrieve");
  metrics.RpcFinished("Retrieve", 9, 10.0);  // +Inf only
  metrics.RpcStarted("PutBlocks");           // still open
  const std::string text = metrics.Render();
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"Retrieve\",code=\"OK\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_requests_total{method=\"Retrieve\",code=\"FAILED_"
                              "PRECONDITION\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_latency_seconds_bucket{method=\"Retrieve\",le="
                              "\"0.00025\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_latency_seconds_bucket{method=\"Retrieve\",le="
                              "\"0.0005\"} 1\n"));
  EXPECT_THAT(text,
              HasSubstr("kvstar_rpc_latency_seconds_bucket{method=\"Retrieve\",le=\"5\"} 2\n"));
  EXPECT_THAT(text,
              HasSubstr("kvstar_rpc_latency_seconds_bucket{method=\"Retrieve\",le=\"+Inf\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_latency_seconds_count{method=\"Retrieve\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_latency_seconds_sum{method=\"Retrieve\"} 12.0004"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_in_flight{method=\"PutBlocks\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_rpc_in_flight{method=\"Retrieve\"} 0\n"));
  EXPECT_THAT(text, Not(HasSubstr("kvstar_tier_bytes")));  // no Stats source given
}

TEST(MetricsTest, NodeStatsAndTenantsAppearAtScrapeTime) {
  int scrapes = 0;
  Metrics metrics({[&] {
                     ++scrapes;
                     return SomeStats();
                   },
                   [] {
                     return std::map<std::string, uint64_t>{{"alpha", 2}, {"be\"ta", 1}};
                   }});
  const std::string text = metrics.Render();
  EXPECT_EQ(scrapes, 1);
  EXPECT_THAT(text, HasSubstr("kvstar_blocks_put_total 40\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_blocks_sent_total 7\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_blocks_skipped_held_total 5\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_bytes{tier=\"dram\"} 4096\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_reads_total{tier=\"dram\",result=\"miss\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_hit_ratio{tier=\"dram\"} 0.75\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_hit_ratio{tier=\"rocksdb\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tier_reclaim_pending_bytes{tier=\"rocksdb\"} 8192\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_sequences 3\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tenant_sequences{tenant=\"alpha\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("kvstar_tenant_sequences{tenant=\"be\\\"ta\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE kvstar_rpc_latency_seconds histogram\n"));
}

TEST(MetricsTest, LogValuesAreQuotedAndEscapedUnlessPlain) {
  EXPECT_EQ(storage::LogValue("seq-1_a.b/c"), "seq-1_a.b/c");
  EXPECT_EQ(storage::LogValue(""), "\"\"");
  EXPECT_EQ(storage::LogValue("two words"), "\"two words\"");
  EXPECT_EQ(storage::LogValue("a=b"), "\"a=b\"");
  EXPECT_EQ(storage::LogValue("q\"\\"), "\"q\\\"\\\\\"");
  EXPECT_EQ(storage::LogValue("line\nevent=x"), "\"line\\x0aevent=x\"");
  EXPECT_EQ(storage::LogValue("\xff"), "\"\\xff\"");
}

TEST(MetricsTest, LabelValuesAreEscaped) {
  EXPECT_EQ(EscapeLabelValue("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
}

TEST(MetricsHttpServerTest, ServesTheExpositionAtSlashMetrics) {
  Metrics metrics({[] { return SomeStats(); }, nullptr});
  metrics.RpcStarted("Stats");
  metrics.RpcFinished("Stats", 0, 0.001);
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("127.0.0.1:0", &metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  httplib::Client http("127.0.0.1", (*server)->port());
  httplib::Result got = http.Get("/metrics");
  ASSERT_TRUE(got) << httplib::to_string(got.error());
  EXPECT_EQ(got->status, 200);
  EXPECT_THAT(got->get_header_value("Content-Type"), HasSubstr("text/plain"));
  EXPECT_THAT(got->body, HasSubstr("kvstar_rpc_requests_total{method=\"Stats\",code=\"OK\"} 1\n"));
  EXPECT_THAT(got->body, HasSubstr("kvstar_blocks_put_total 40\n"));
  EXPECT_EQ(http.Get("/other")->status, 404);
}

TEST(MetricsHttpServerTest, BadAddressesAreInvalidArgument) {
  Metrics metrics({});
  for (const char* address : {"no-port", "127.0.0.1:99999", "127.0.0.1:x"}) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
        MetricsHttpServer::Start(address, &metrics);
    EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument) << address;
    EXPECT_THAT(std::string(server.status().message()), HasSubstr(address));
  }
}

}  // namespace
}  // namespace kvstar::server
