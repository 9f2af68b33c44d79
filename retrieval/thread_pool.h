// A fixed pool of worker threads that runs one parallel loop at a time.
#ifndef KVSTAR_RETRIEVAL_THREAD_POOL_H_
#define KVSTAR_RETRIEVAL_THREAD_POOL_H_

#include <cstddef>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvstar::retrieval {

// Thread-safe: concurrent ParallelFor calls run one after another.
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
  void ParallelFor(size_t num_tasks, const std::function<void(size_t, size_t)>& task);

 private:
  void WorkerLoop(size_t thread);
  void RunTasks(size_t thread);

  absl::Mutex run_mu_;  // serializes ParallelFor calls
  absl::Mutex mu_;
  const std::function<void(size_t, size_t)>* task_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t num_tasks_ ABSL_GUARDED_BY(mu_) = 0;
  size_t next_task_ ABSL_GUARDED_BY(mu_) = 0;
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;  // workers inside the current loop
  size_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_THREAD_POOL_H_
