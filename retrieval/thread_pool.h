// A fixed pool of worker threads that runs one parallel loop at a time.
#ifndef KVSTAR_RETRIEVAL_THREAD_POOL_H_
#define KVSTAR_RETRIEVAL_THREAD_POOL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvstar::retrieval {

// Thread-safe: concurrent ParallelFor calls run one after another.
//
// Cost per loop: one atomic store to start it (plus one wake-up of all sleeping workers, if any
// slept); per task one compare-and-swap to claim it and one atomic add when it finishes. Idle
// workers spin (yielding) for kSpinMicros before they sleep, so back-to-back loops find them
// awake; a loop started later wakes all of them with one broadcast.
class ThreadPool {
 public:
  // num_threads == 0: one per hardware thread. The calling thread of ParallelFor also works,
  // so the pool starts num_threads - 1 workers.
  explicit ThreadPool(size_t num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t num_threads() const { return workers_.size() + 1; }

  // Runs task(index, thread) for every index in [0, num_tasks), indices claimed in increasing
  // order by whichever thread is free; thread is in [0, num_threads()). Returns when all ran.
  // REQUIRES: num_tasks < 2^32 - 1.
  void ParallelFor(size_t num_tasks, const std::function<void(size_t, size_t)>& task);

  static constexpr int64_t kSpinMicros = 100;

 private:
  void WorkerLoop(size_t thread);
  // Claims and runs tasks of loop `epoch` until none is left (or another loop started).
  void RunTasks(uint32_t epoch, size_t thread);

  absl::Mutex run_mu_;  // serializes ParallelFor calls
  uint32_t epoch_ ABSL_GUARDED_BY(run_mu_) = 0;
  // The current loop: its epoch in the high 32 bits, its next unclaimed index in the low ones
  // (kClosed once the loop returned, so late workers claim nothing).
  std::atomic<uint64_t> claim_{0};
  std::atomic<const std::function<void(size_t, size_t)>*> task_{nullptr};
  std::atomic<uint32_t> num_tasks_{0};
  std::atomic<uint32_t> finished_{0};  // tasks of the current loop that returned
  std::atomic<bool> stop_{false};

  // Sleeping workers, and the caller when it waits for the last tasks.
  absl::Mutex sleep_mu_;
  absl::CondVar wake_workers_;
  absl::CondVar loop_done_;
  std::atomic<uint32_t> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};

  std::vector<std::thread> workers_;
};

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_THREAD_POOL_H_
