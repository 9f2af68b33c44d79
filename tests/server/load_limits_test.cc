// LoadLimits: streams and in-flight put bytes are bounded per tenant and in total, refusals name
// the limit and its flag, and the node reports NOT_SERVING exactly while a total limit is reached.
#include "server/load_limits.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

using ::testing::HasSubstr;

LoadLimitsOptions Small() {
  LoadLimitsOptions options;
  options.max_open_streams = 3;
  options.max_open_streams_per_tenant = 2;
  options.max_inflight_put_bytes = 100;
  options.max_inflight_put_bytes_per_tenant = 60;
  return options;
}

TEST(LoadLimitsTest, StreamsBeyondATenantsLimitAreRefusedNamingIt) {
  LoadLimits limits(Small());
  ASSERT_TRUE(limits.OpenStream("a").ok());
  ASSERT_TRUE(limits.OpenStream("a").ok());
  absl::Status refused = limits.OpenStream("a");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("tenant a"));
  EXPECT_THAT(refused.message(), HasSubstr("--max_open_streams_per_tenant=2"));
  // Another tenant still gets one, up to the node's total.
  ASSERT_TRUE(limits.OpenStream("b").ok());
  refused = limits.OpenStream("b");
  EXPECT_THAT(refused.message(), HasSubstr("--max_open_streams=3"));
  limits.CloseStream("a");
  EXPECT_TRUE(limits.OpenStream("b").ok());
  EXPECT_EQ(limits.open_streams(), 3u);
}

TEST(LoadLimitsTest, PutBytesBeyondALimitAreRefusedAndReleasedBytesAdmitMore) {
  LoadLimits limits(Small());
  ASSERT_TRUE(limits.ReservePutBytes("a", 50).ok());
  absl::Status refused = limits.ReservePutBytes("a", 20);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("--max_inflight_put_bytes_per_tenant=60"));
  ASSERT_TRUE(limits.ReservePutBytes("b", 50).ok());
  refused = limits.ReservePutBytes("c", 1);
  EXPECT_THAT(refused.message(), HasSubstr("--max_inflight_put_bytes=100"));
  limits.ReleasePutBytes("a", 30);
  EXPECT_TRUE(limits.ReservePutBytes("c", 30).ok());
  EXPECT_EQ(limits.inflight_put_bytes(), 100u);
}

TEST(LoadLimitsTest, ServingFollowsTheTotalLimits) {
  std::vector<bool> changes;
  LoadLimits limits(Small(), [&](bool serving) { changes.push_back(serving); });
  EXPECT_TRUE(limits.CanTakeWork());
  ASSERT_TRUE(limits.OpenStream("a").ok());
  ASSERT_TRUE(limits.OpenStream("b").ok());
  EXPECT_TRUE(changes.empty());
  ASSERT_TRUE(limits.OpenStream("c").ok());  // the third of three
  EXPECT_FALSE(limits.CanTakeWork());
  limits.CloseStream("b");
  EXPECT_TRUE(limits.CanTakeWork());
  ASSERT_TRUE(limits.ReservePutBytes("a", 60).ok());
  ASSERT_TRUE(limits.ReservePutBytes("b", 40).ok());  // 100 of 100
  EXPECT_FALSE(limits.CanTakeWork());
  limits.ReleasePutBytes("b", 40);
  EXPECT_EQ(changes, (std::vector<bool>{false, true, false, true}));
}

}  // namespace
}  // namespace kvstar::server
