#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

TEST(SharedMemoryArenaTest, AnotherProcessSeesWhatIsWrittenUntilTheArenaIsGone) {
  std::string name;
  {
    auto arena = SharedMemoryArena::Create(1 << 20);
    ASSERT_TRUE(arena.ok()) << arena.status();
    name = (*arena)->name();
    std::optional<uint64_t> offset = (*arena)->Allocate(100);
    ASSERT_TRUE(offset.has_value());
    std::memcpy((*arena)->base() + *offset, "kvstar", 6);

    // What a client does: open by name, map read-only.
    const int fd = shm_open(name.c_str(), O_RDONLY, 0);
    ASSERT_GE(fd, 0);
    void* view = mmap(nullptr, 1 << 20, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    ASSERT_NE(view, MAP_FAILED);
    EXPECT_EQ(std::memcmp(static_cast<char*>(view) + *offset, "kvstar", 6), 0);
    munmap(view, 1 << 20);
  }
  EXPECT_LT(shm_open(name.c_str(), O_RDONLY, 0), 0) << "the segment outlived its arena";
}

TEST(SharedMemoryArenaTest, AllocatesAlignedFirstFitAndCoalescesFreedNeighbours) {
  auto arena = SharedMemoryArena::Create(4096);
  ASSERT_TRUE(arena.ok()) << arena.status();
  SharedMemoryArena& a = **arena;
  std::optional<uint64_t> x = a.Allocate(1000), y = a.Allocate(1000), z = a.Allocate(1000);
  ASSERT_TRUE(x && y && z);
  EXPECT_EQ(*x % 64, 0u);
  EXPECT_EQ(*y % 64, 0u);
  EXPECT_EQ(*z % 64, 0u);
  EXPECT_FALSE(a.Allocate(2000).has_value()) << "only ~1 KiB is left";
  a.Free(*x);
  a.Free(*y);  // coalesces with x's range
  std::optional<uint64_t> big = a.Allocate(2000);
  ASSERT_TRUE(big.has_value());
  EXPECT_EQ(*big, *x);
  a.Free(*big);
  a.Free(*z);
  EXPECT_EQ(a.free_bytes(), 4096u);
  EXPECT_EQ(a.Allocate(4096), std::optional<uint64_t>(0));
}

TEST(SharedMemoryArenaTest, RemovesSegmentsOfDeadServersButNotOfLiveOnes) {
  // A segment nobody holds a lock on: what a server killed with SIGKILL leaves behind.
  const std::string stale = "/kvstar-00000000deadbeef";
  const int fd = shm_open(stale.c_str(), O_CREAT | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  auto live = SharedMemoryArena::Create(4096);
  ASSERT_TRUE(live.ok());
  EXPECT_LT(shm_open(stale.c_str(), O_RDONLY, 0), 0) << "the stale segment is still there";

  auto another = SharedMemoryArena::Create(4096);  // runs the cleanup again
  ASSERT_TRUE(another.ok());
  EXPECT_NE((*another)->name(), (*live)->name());
  const int live_fd = shm_open((*live)->name().c_str(), O_RDONLY, 0);
  EXPECT_GE(live_fd, 0) << "a live server's segment was removed";
  if (live_fd >= 0) close(live_fd);
}

TEST(SharedMemoryArenaTest, FreeingAnUnknownOffsetChangesNothing) {
  auto arena = SharedMemoryArena::Create(4096);
  ASSERT_TRUE(arena.ok());
  (*arena)->Free(128);
  EXPECT_EQ((*arena)->free_bytes(), 4096u);
}

}  // namespace
}  // namespace kvstar::server
