#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

TEST(SharedMemoryArenaTest, AReadOnlyMappingOfItsDescriptorSeesWhatIsWrittenAndNothingIsNamed) {
  auto arena = SharedMemoryArena::Create(1 << 20, "kvstar-test-0000000000000001");
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::optional<uint64_t> offset = (*arena)->Allocate(100);
  ASSERT_TRUE(offset.has_value());
  std::memcpy((*arena)->base() + *offset, "kvstar", 6);

  // What a client does with the descriptor it received: map it read-only.
  void* view = mmap(nullptr, 1 << 20, PROT_READ, MAP_SHARED, (*arena)->fd(), 0);
  ASSERT_NE(view, MAP_FAILED);
  EXPECT_EQ(std::memcmp(static_cast<char*>(view) + *offset, "kvstar", 6), 0);
  munmap(view, 1 << 20);
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    EXPECT_EQ(entry.path().filename().string().find((*arena)->id()), std::string::npos);
  }
}

TEST(SharedMemoryArenaTest, ItsDescriptorCannotBeResizedWrittenOrMappedWritable) {
  auto arena = SharedMemoryArena::Create(1 << 16, "kvstar-test-0000000000000002");
  ASSERT_TRUE(arena.ok()) << arena.status();
  const int fd = (*arena)->fd();
  EXPECT_NE(ftruncate(fd, 0), 0);
  EXPECT_NE(ftruncate(fd, 1 << 17), 0);
  EXPECT_EQ(pwrite(fd, "x", 1, 0), -1);
  EXPECT_EQ(mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  const int seals = fcntl(fd, F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL),
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL);
  // The arena's own mapping still writes.
  (*arena)->base()[0] = 'k';
  EXPECT_EQ((*arena)->base()[0], 'k');
}

TEST(SharedMemoryArenaTest, AllocatesAlignedFirstFitAndCoalescesFreedNeighbours) {
  auto arena = SharedMemoryArena::Create(4096, "kvstar-test-0000000000000003");
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

TEST(SharedMemoryArenaTest, FreedRegionsAreZeroedBeforeAnyoneGetsThemAgain) {
  auto arena = SharedMemoryArena::Create(4096, "kvstar-test-0000000000000004");
  ASSERT_TRUE(arena.ok()) << arena.status();
  SharedMemoryArena& a = **arena;
  std::optional<uint64_t> x = a.Allocate(1000), y = a.Allocate(1000);
  ASSERT_TRUE(x && y);
  std::memset(a.base() + *x, 0xab, 1000);
  std::memset(a.base() + *y, 0xcd, 1000);
  a.Free(*x);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(a.base()[*x + i], 0) << "byte " << i;
  EXPECT_EQ(static_cast<unsigned char>(a.base()[*y]), 0xcd) << "a live region was touched";
  std::optional<uint64_t> again = a.Allocate(1000);
  ASSERT_EQ(again, x);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(a.base()[*again + i], 0) << "byte " << i;
}

TEST(SharedMemoryArenaTest, ManyRegionsFreedOnAPoolAreZeroedAndCoalesced) {
  constexpr uint64_t kBytes = 1 << 20;
  auto arena = SharedMemoryArena::Create(kBytes, "kvstar-test-0000000000000006");
  ASSERT_TRUE(arena.ok()) << arena.status();
  SharedMemoryArena& a = **arena;
  std::vector<uint64_t> freed, kept;
  for (int i = 0; i < 200; ++i) {
    std::optional<uint64_t> offset = a.Allocate(3000 + i);
    ASSERT_TRUE(offset.has_value());
    std::memset(a.base() + *offset, 0x5a, 3000 + i);
    (i % 4 == 3 ? kept : freed).push_back(*offset);
  }
  freed.push_back(12345);  // not a region: ignored
  retrieval::ThreadPool pool(4);
  a.Free(freed, &pool);
  for (size_t i = 0; i + 1 < freed.size(); ++i) {
    for (uint64_t b = 0; b < 3000; ++b) ASSERT_EQ(a.base()[freed[i] + b], 0) << "region " << i;
  }
  for (uint64_t offset : kept) {
    EXPECT_EQ(static_cast<unsigned char>(a.base()[offset]), 0x5a) << "a live region was touched";
  }
  a.Free(kept, &pool);
  EXPECT_EQ(a.free_bytes(), kBytes);
  EXPECT_EQ(a.Allocate(kBytes), std::optional<uint64_t>(0)) << "every range coalesced into one";
}

TEST(SharedMemoryArenaTest, ReleasedRegionsKeepTheirBytesUntilReusedAndPaddingIsZeroed) {
  auto arena = SharedMemoryArena::Create(4096, "kvstar-test-0000000000000007");
  ASSERT_TRUE(arena.ok()) << arena.status();
  SharedMemoryArena& a = **arena;
  std::optional<uint64_t> x = a.Allocate(1024), y = a.Allocate(1024);
  ASSERT_TRUE(x && y);
  std::memset(a.base() + *x, 0xab, 1024);
  std::memset(a.base() + *y, 0xcd, 1024);
  const uint64_t released[] = {*x, *y, 77};  // 77: not a region, ignored
  a.Release(released, /*owner=*/3);
  EXPECT_EQ(a.free_bytes(), 4096u) << "both came back, coalesced with the rest";
  EXPECT_EQ(static_cast<unsigned char>(a.base()[*x + 5]), 0xab) << "released, not cleared";
  // Reused for 1000 bytes: the caller writes those, the 24 bytes of padding are zeroed.
  std::optional<uint64_t> again = a.Allocate(1000);
  ASSERT_EQ(again, x);
  for (int i = 1000; i < 1024; ++i) ASSERT_EQ(a.base()[*again + i], 0) << "padding byte " << i;
}

TEST(SharedMemoryArenaTest, ZeroReleasedClearsOnlyThatOwnersUnreusedRegions) {
  auto arena = SharedMemoryArena::Create(8192, "kvstar-test-0000000000000008");
  ASSERT_TRUE(arena.ok()) << arena.status();
  SharedMemoryArena& a = **arena;
  std::vector<uint64_t> regions;
  for (int i = 0; i < 4; ++i) {
    std::optional<uint64_t> offset = a.Allocate(1024);
    ASSERT_TRUE(offset.has_value());
    std::memset(a.base() + *offset, 0x10 + i, 1024);
    regions.push_back(*offset);
  }
  a.Release({regions[0], regions[1]}, /*owner=*/7);
  a.Release({regions[2]}, /*owner=*/8);
  // Owner 7's first region is reused (and overwritten) by another block before the drop.
  std::optional<uint64_t> reused = a.Allocate(1024);
  ASSERT_EQ(reused, regions[0]);
  std::memset(a.base() + *reused, 0x77, 1024);

  retrieval::ThreadPool pool(2);
  a.ZeroReleased(7, &pool);
  for (int b = 0; b < 1024; ++b) ASSERT_EQ(a.base()[regions[1] + b], 0) << "byte " << b;
  EXPECT_EQ(a.base()[*reused], 0x77) << "a reused region is another block's now";
  EXPECT_EQ(a.base()[regions[2]], 0x12) << "owner 8's region was touched";
  EXPECT_EQ(a.base()[regions[3]], 0x13) << "a live region was touched";
  EXPECT_EQ(a.free_bytes(), 8192u - 2 * 1024);

  a.Free({*reused, regions[3]}, &pool);
  a.ZeroReleased(8, nullptr);
  EXPECT_EQ(a.Allocate(8192), std::optional<uint64_t>(0)) << "all zeroed and coalesced again";
}

TEST(SharedMemoryArenaTest, CopyToSegmentCopiesEveryByteAtAnyAlignmentAndLength) {
  std::vector<char> from(5000), to(5100);
  for (size_t i = 0; i < from.size(); ++i) from[i] = static_cast<char>(i * 131 + 7);
  for (size_t to_shift : {0, 1, 15, 16, 33}) {
    for (size_t from_shift : {0, 3, 64}) {
      for (size_t bytes : {0, 1, 15, 63, 64, 65, 1000, 4096 + 17}) {
        std::fill(to.begin(), to.end(), 0);
        CopyToSegment(to.data() + to_shift, from.data() + from_shift, bytes);
        ASSERT_EQ(std::memcmp(to.data() + to_shift, from.data() + from_shift, bytes), 0)
            << bytes << " bytes to +" << to_shift << " from +" << from_shift;
        for (size_t i = 0; i < to.size(); ++i) {
          if (i < to_shift || i >= to_shift + bytes) {
            ASSERT_EQ(to[i], 0) << "wrote byte " << i;
          }
        }
      }
    }
  }
}

TEST(SharedMemoryArenaTest, FreeingAnUnknownOffsetChangesNothing) {
  auto arena = SharedMemoryArena::Create(4096, "kvstar-test-0000000000000005");
  ASSERT_TRUE(arena.ok());
  (*arena)->Free(128);
  EXPECT_EQ((*arena)->free_bytes(), 4096u);
}

}  // namespace
}  // namespace kvstar::server
