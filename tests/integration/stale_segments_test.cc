// The real kvstar_server at start removes the /dev/shm segments that older servers left behind
// (server/stale_segments.h), logs each one, and keeps a segment a live server still holds.
// Exclusive (BUILD): any kvstar_server starting meanwhile would remove the planted segment too,
// and the log line checked here would then be another server's.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string RandomSegmentName() {
  std::random_device random;
  const uint64_t bits = (uint64_t{random()} << 32) ^ random();
  return absl::StrFormat("kvstar-%016x", bits);
}

// Makes /dev/shm/<name> of `bytes` bytes the way an old server did; with `hold`, keeps a shared
// flock on it (a server still running) and returns the descriptor, else -1. The file is made
// under a name no server removes and renamed into place only once it is complete and locked.
int Plant(const std::string& name, size_t bytes, bool hold) {
  const std::string staging = "/dev/shm/" + name + ".planting";
  const int fd = open(staging.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return -2;
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0 || (hold && flock(fd, LOCK_SH) != 0) ||
      rename(staging.c_str(), ("/dev/shm/" + name).c_str()) != 0) {
    close(fd);
    unlink(staging.c_str());
    return -2;
  }
  if (hold) return fd;
  close(fd);
  return -1;
}

bool Exists(const std::string& name) {
  struct stat st;
  return lstat(("/dev/shm/" + name).c_str(), &st) == 0;
}

TEST(StaleSegmentsTest, ServerStartRemovesLeftoverSegmentsAndKeepsHeldOnes) {
  struct stat shm;
  if (stat("/dev/shm", &shm) != 0 || access("/dev/shm", W_OK) != 0) {
    GTEST_SKIP() << "no writable /dev/shm here";
  }
  const std::string stale = RandomSegmentName();
  const std::string held = RandomSegmentName();
  ASSERT_EQ(Plant(stale, 8192, /*hold=*/false), -1);
  const int held_fd = Plant(held, 4096, /*hold=*/true);
  ASSERT_GE(held_fd, 0);

  const std::string dir = MakeTempDir("stale-segments");
  ServerProcess server({"--data_dir=" + dir + "/data", "--log_level=info"});
  server.LogTo(dir + "/server.log");
  ASSERT_TRUE(server.Start().ok());
  EXPECT_FALSE(Exists(stale)) << stale;
  EXPECT_TRUE(Exists(held)) << held;
  ASSERT_TRUE(server.Stop().ok());

  std::ifstream in(dir + "/server.log");
  const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(log, HasSubstr(absl::StrCat("event=stale_segment_removed segment=/dev/shm/", stale,
                                          " bytes=8192 reason=no_live_server_holds_it")));
  EXPECT_THAT(log, Not(HasSubstr(held)));
  EXPECT_THAT(log, Not(HasSubstr("event=stale_segment_kept")));

  close(held_fd);
  unlink(("/dev/shm/" + held).c_str());
}

}  // namespace
}  // namespace kvstar::testing
