#include "server/tenant_segments.h"

#include <cstring>

#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

TEST(TenantSegmentsTest, ATenantsSegmentIsCreatedOnFirstUseAndThenAlwaysTheSame) {
  TenantSegments segments(1 << 20, 1 << 19);
  EXPECT_EQ(segments.Find("alpha"), nullptr);
  EXPECT_EQ(segments.BytesFor("alpha"), 1u << 19);
  EXPECT_EQ(segments.allotted_bytes(), 0u);
  absl::StatusOr<SharedMemoryArena*> alpha = segments.Obtain("alpha");
  ASSERT_TRUE(alpha.ok()) << alpha.status();
  EXPECT_EQ((*alpha)->size(), 1u << 19);
  EXPECT_EQ(segments.Find("alpha"), *alpha);
  EXPECT_EQ(*segments.Obtain("alpha"), *alpha);
  EXPECT_EQ(segments.allotted_bytes(), 1u << 19);
  EXPECT_EQ((*alpha)->id().rfind("kvstar-alpha-", 0), 0u) << (*alpha)->id();
}

TEST(TenantSegmentsTest, TenantsGetTheirAllotmentThenWhatIsLeftThenNothing) {
  // 2.5 allotments of 1 MiB.
  TenantSegments segments(5 << 19, 1 << 20);
  absl::StatusOr<SharedMemoryArena*> a = segments.Obtain("a");
  absl::StatusOr<SharedMemoryArena*> b = segments.Obtain("b");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->size(), 1u << 20);
  EXPECT_EQ((*b)->size(), 1u << 20);
  EXPECT_NE((*a)->id(), (*b)->id());
  EXPECT_NE((*a)->fd(), (*b)->fd());
  EXPECT_EQ(segments.BytesFor("c"), 1u << 19);
  absl::StatusOr<SharedMemoryArena*> c = segments.Obtain("c");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->size(), 1u << 19);
  EXPECT_EQ(segments.BytesFor("d"), 0u);
  absl::StatusOr<SharedMemoryArena*> d = segments.Obtain("d");
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(d.status().message().find("--shared_memory_bytes"), absl::string_view::npos)
      << d.status();
  EXPECT_EQ(segments.Find("d"), nullptr);
  EXPECT_EQ(segments.allotted_bytes(), 5u << 19);
}

TEST(TenantSegmentsTest, OneTenantsRegionsAreNotInAnotherTenantsSegment) {
  TenantSegments segments(1 << 20, 1 << 19);
  SharedMemoryArena* a = *segments.Obtain("a");
  SharedMemoryArena* b = *segments.Obtain("b");
  const uint64_t offset = *a->Allocate(64);
  std::memcpy(a->base() + offset, "secret of a", 11);
  EXPECT_NE(std::memcmp(b->base() + offset, "secret of a", 11), 0);
}

}  // namespace
}  // namespace kvstar::server
