// WorkPool: a fixed set of threads that run queued tasks in order of arrival. The gRPC edge
// hands every call that touches the store or scores a retrieval to it, so gRPC's own threads
// never block on disk or CPU work and an idle stream holds no thread at all.
// Thread-safe: Schedule may be called from any thread, including the pool's own.
#ifndef KVSTAR_SERVER_WORK_POOL_H_
#define KVSTAR_SERVER_WORK_POOL_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvstar::server {

class WorkPool {
 public:
  // REQUIRES: num_threads >= 1.
  explicit WorkPool(size_t num_threads);
  // Runs the tasks still queued, then joins the threads.
  ~WorkPool();

  void Schedule(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_);

  size_t num_threads() const { return threads_.size(); }
  // Tasks waiting for a thread (not counting those running).
  size_t queued() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run() ABSL_LOCKS_EXCLUDED(mu_);
  bool HasWorkOrStops() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_WORK_POOL_H_
