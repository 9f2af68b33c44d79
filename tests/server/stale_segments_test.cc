// RemoveStaleSegments over a directory of the test's own (never the real /dev/shm, which other
// tests and servers share): what it removes, what it keeps, and why.
#include "server/stale_segments.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

using ::testing::IsEmpty;

class StaleSegmentsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* root = std::getenv("TEST_TMPDIR");
    std::string pattern = std::string(root != nullptr ? root : "/tmp") + "/shmXXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  // A segment as an old server made it: `bytes` bytes, mode 0600.
  void Make(const std::string& name, size_t bytes) {
    std::ofstream(Path(name)) << std::string(bytes, 'k');
    ASSERT_EQ(chmod(Path(name).c_str(), 0600), 0);
  }
  bool Exists(const std::string& name) const {
    struct stat st;
    return lstat(Path(name).c_str(), &st) == 0;
  }

  std::string dir_;
};

TEST_F(StaleSegmentsTest, ASegmentNoServerHoldsIsRemovedAndReported) {
  Make("kvstar-0123456789abcdef", 4096);
  const StaleSegmentScan scan = RemoveStaleSegments(dir_);
  ASSERT_EQ(scan.removed.size(), 1u);
  EXPECT_EQ(scan.removed[0].name, "kvstar-0123456789abcdef");
  EXPECT_EQ(scan.removed[0].bytes, 4096u);
  EXPECT_THAT(scan.errors, IsEmpty());
  EXPECT_FALSE(Exists("kvstar-0123456789abcdef"));
}

TEST_F(StaleSegmentsTest, ASegmentALiveServerHoldsIsKept) {
  Make("kvstar-00000000000000aa", 64);
  Make("kvstar-00000000000000bb", 64);
  // What a running old server did for its whole life: a shared flock on its segment.
  const int fd = open(Path("kvstar-00000000000000aa").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_SH), 0);
  const StaleSegmentScan scan = RemoveStaleSegments(dir_);
  ASSERT_EQ(scan.removed.size(), 1u);
  EXPECT_EQ(scan.removed[0].name, "kvstar-00000000000000bb");
  EXPECT_THAT(scan.errors, IsEmpty());
  EXPECT_TRUE(Exists("kvstar-00000000000000aa"));
  // Once it is gone, the next start removes it.
  close(fd);
  EXPECT_EQ(RemoveStaleSegments(dir_).removed.size(), 1u);
  EXPECT_FALSE(Exists("kvstar-00000000000000aa"));
}

TEST_F(StaleSegmentsTest, OtherNamesAreNeverTouched) {
  const std::string kept[] = {
      "kvstar-0123456789ABCDEF",         // upper case: not what old servers made
      "kvstar-0123456789abcde",          // 15 digits
      "kvstar-0123456789abcdef0",        // 17 digits
      "kvstar-4242-0",                   // the oldest servers' pid names
      "kvstar-alpha-0123456789abcdef",   // today's memfd names, should one ever be a file
      "other-0123456789abcdef",          // someone else's
      "kvstar-0123456789abcdef.backup",  // a copy
  };
  for (const std::string& name : kept) Make(name, 16);
  const StaleSegmentScan scan = RemoveStaleSegments(dir_);
  EXPECT_THAT(scan.removed, IsEmpty());
  EXPECT_THAT(scan.errors, IsEmpty());
  for (const std::string& name : kept) EXPECT_TRUE(Exists(name)) << name;
}

TEST_F(StaleSegmentsTest, OnlyRegularFilesAreRemovedAndSymlinksAreNotFollowed) {
  Make("target", 16);
  ASSERT_EQ(symlink(Path("target").c_str(), Path("kvstar-aaaaaaaaaaaaaaaa").c_str()), 0);
  ASSERT_EQ(mkdir(Path("kvstar-bbbbbbbbbbbbbbbb").c_str(), 0700), 0);
  ASSERT_EQ(mkfifo(Path("kvstar-cccccccccccccccc").c_str(), 0600), 0);  // opening it must not hang
  const StaleSegmentScan scan = RemoveStaleSegments(dir_);
  EXPECT_THAT(scan.removed, IsEmpty());
  EXPECT_THAT(scan.errors, IsEmpty());
  EXPECT_TRUE(Exists("kvstar-aaaaaaaaaaaaaaaa"));
  EXPECT_TRUE(Exists("target"));
  EXPECT_TRUE(Exists("kvstar-bbbbbbbbbbbbbbbb"));
  EXPECT_TRUE(Exists("kvstar-cccccccccccccccc"));
}

TEST_F(StaleSegmentsTest, AnotherUsersSegmentIsKept) {
  Make("kvstar-dddddddddddddddd", 16);
  // Needs root outside a user namespace (Bazel's sandbox maps no other uid).
  if (chown(Path("kvstar-dddddddddddddddd").c_str(), 65534, 65534) != 0) {
    GTEST_SKIP() << "cannot give a file to another uid here: " << std::strerror(errno);
  }
  const StaleSegmentScan scan = RemoveStaleSegments(dir_);
  EXPECT_THAT(scan.removed, IsEmpty());
  EXPECT_THAT(scan.errors, IsEmpty());
  EXPECT_TRUE(Exists("kvstar-dddddddddddddddd"));
}

TEST_F(StaleSegmentsTest, AMissingDirectoryHasNothingToRemove) {
  const StaleSegmentScan scan = RemoveStaleSegments(dir_ + "/missing");
  EXPECT_THAT(scan.removed, IsEmpty());
  EXPECT_THAT(scan.errors, IsEmpty());
}

TEST(OldSegmentNameTest, IsExactlyThePrefixAndSixteenLowerCaseHexDigits) {
  EXPECT_TRUE(IsOldSegmentName("kvstar-0123456789abcdef"));
  EXPECT_TRUE(IsOldSegmentName("kvstar-ffffffffffffffff"));
  EXPECT_FALSE(IsOldSegmentName("kvstar-0123456789abcdeg"));
  EXPECT_FALSE(IsOldSegmentName("kvstar-"));
  EXPECT_FALSE(IsOldSegmentName("Kvstar-0123456789abcdef"));
  EXPECT_FALSE(IsOldSegmentName(""));
}

}  // namespace
}  // namespace kvstar::server
