// WorkPool: every task runs once, on the pool's threads, concurrently; destruction runs what is
// still queued.
#include "server/work_pool.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

TEST(WorkPoolTest, TasksRunConcurrentlyOnThePoolsThreads) {
  absl::Notification first_running, second_ran;
  std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> on_caller{false};
  // Declared after what its tasks use, so it joins them before those go: the first task may still
  // be inside second_ran.WaitForNotification() when the caller's wait returns (TSan saw it).
  WorkPool pool(2);
  // The first task waits for the second: only two threads running at once can finish both.
  pool.Schedule([&] {
    on_caller = on_caller || std::this_thread::get_id() == caller;
    first_running.Notify();
    second_ran.WaitForNotification();
  });
  pool.Schedule([&] {
    first_running.WaitForNotification();
    second_ran.Notify();
  });
  second_ran.WaitForNotification();
  EXPECT_FALSE(on_caller.load());
}

TEST(WorkPoolTest, DestructionRunsEveryQueuedTask) {
  std::atomic<int> ran{0};
  {
    absl::Notification release;  // Before the pool, for the same reason as above.
    WorkPool pool(1);
    pool.Schedule([&] { release.WaitForNotification(); });
    for (int i = 0; i < 100; ++i) pool.Schedule([&] { ++ran; });
    EXPECT_GE(pool.queued(), 1u);
    release.Notify();
  }
  EXPECT_EQ(ran.load(), 100);
}

}  // namespace
}  // namespace kvstar::server
