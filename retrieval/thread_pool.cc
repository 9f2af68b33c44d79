#include "retrieval/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // _mm_pause
#endif

namespace kvstar::retrieval {
namespace {

constexpr uint64_t kIndexMask = 0xFFFFFFFFu;
constexpr uint64_t kClosed = kIndexMask;

uint32_t EpochOf(uint64_t claim) { return static_cast<uint32_t>(claim >> 32); }

void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Polls `done` for up to ThreadPool::kSpinMicros; returns whether it became true. Yields between
// polls so that an oversubscribed host still runs the threads being waited for.
template <typename Predicate>
bool SpinUntil(const Predicate& done) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::microseconds(ThreadPool::kSpinMicros);
  for (uint32_t round = 0;; ++round) {
    for (int i = 0; i < 32; ++i) {
      if (done()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() > deadline) return done();
    std::this_thread::yield();
  }
}

}  // namespace

ThreadPool::ThreadPool(size_t num_threads) {
  if (num_threads == 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  workers_.reserve(num_threads - 1);
  for (size_t t = 1; t < num_threads; ++t) workers_.emplace_back([this, t] { WorkerLoop(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    absl::MutexLock lock(&sleep_mu_);
    wake_workers_.SignalAll();
  }
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunTasks(uint32_t epoch, size_t thread) {
  // Read before the claim word: if they belong to a later loop, so does every claim word seen
  // afterwards, and the epoch check below rejects it.
  const auto* task = task_.load(std::memory_order_acquire);
  const uint32_t num_tasks = num_tasks_.load(std::memory_order_acquire);
  uint64_t claim = claim_.load(std::memory_order_acquire);
  for (;;) {
    if (EpochOf(claim) != epoch || (claim & kIndexMask) >= num_tasks) return;
    if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;
    }
    (*task)(claim & kIndexMask, thread);
    if (finished_.fetch_add(1) + 1 == num_tasks && caller_sleeping_.load()) {
      absl::MutexLock lock(&sleep_mu_);
      loop_done_.Signal();
    }
    claim = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::WorkerLoop(size_t thread) {
  uint32_t seen_epoch = 0;
  auto woken = [this, &seen_epoch] { return stop_.load() || EpochOf(claim_.load()) != seen_epoch; };
  for (;;) {
    if (!SpinUntil(woken)) {
      absl::MutexLock lock(&sleep_mu_);
      sleeping_workers_.fetch_add(1);
      while (!woken()) wake_workers_.Wait(&sleep_mu_);
      sleeping_workers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen_epoch = EpochOf(claim_.load(std::memory_order_acquire));
    RunTasks(seen_epoch, thread);
  }
}

void ThreadPool::ParallelFor(size_t num_tasks, const std::function<void(size_t, size_t)>& task) {
  if (num_tasks == 0) return;
  absl::MutexLock run_lock(&run_mu_);
  const uint32_t epoch = ++epoch_;
  task_.store(&task, std::memory_order_release);
  num_tasks_.store(static_cast<uint32_t>(num_tasks), std::memory_order_release);
  finished_.store(0, std::memory_order_release);
  claim_.store(uint64_t{epoch} << 32);  // publishes the loop
  if (sleeping_workers_.load() > 0) {
    absl::MutexLock lock(&sleep_mu_);
    wake_workers_.SignalAll();
  }
  RunTasks(epoch, 0);
  // Every task is claimed; wait for workers still running theirs.
  auto done = [this, num_tasks] { return finished_.load() == num_tasks; };
  if (!SpinUntil(done)) {
    absl::MutexLock lock(&sleep_mu_);
    caller_sleeping_.store(true);
    while (!done()) loop_done_.Wait(&sleep_mu_);
    caller_sleeping_.store(false);
  }
  claim_.store((uint64_t{epoch} << 32) | kClosed);
}

}  // namespace kvstar::retrieval
