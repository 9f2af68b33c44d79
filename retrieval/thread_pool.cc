#include "retrieval/thread_pool.h"

#include <algorithm>

namespace kvstar::retrieval {

ThreadPool::ThreadPool(size_t num_threads) {
  if (num_threads == 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  workers_.reserve(num_threads - 1);
  for (size_t t = 1; t < num_threads; ++t) workers_.emplace_back([this, t] { WorkerLoop(t); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunTasks(size_t thread) {
  for (;;) {
    size_t index;
    const std::function<void(size_t, size_t)>* task;
    {
      absl::MutexLock lock(&mu_);
      if (next_task_ >= num_tasks_) return;
      index = next_task_++;
      task = task_;
    }
    (*task)(index, thread);
  }
}

void ThreadPool::WorkerLoop(size_t thread) {
  size_t seen_generation = 0;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      auto woken = [this, seen_generation]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return stop_ || generation_ != seen_generation;
      };
      mu_.Await(absl::Condition(&woken));
      if (stop_) return;
      seen_generation = generation_;
      ++running_;
    }
    RunTasks(thread);
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

void ThreadPool::ParallelFor(size_t num_tasks, const std::function<void(size_t, size_t)>& task) {
  absl::MutexLock run_lock(&run_mu_);
  {
    absl::MutexLock lock(&mu_);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    ++generation_;
  }
  RunTasks(0);
  absl::MutexLock lock(&mu_);
  // Every task is claimed; wait for workers still running theirs.
  auto done = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return running_ == 0; };
  mu_.Await(absl::Condition(&done));
  task_ = nullptr;
}

}  // namespace kvstar::retrieval
