// RetrievalScheduler: the client's background retrieval. Every retrieval_stride steps a sequence
// is due; Client::Step hands the due sequences of all sealed sequences to one background thread,
// which sends them as one Retrieve (continuous batching), reads the replies layer by layer as
// they stream in and loads each layer's new blocks into slots (SequenceImpl::LoadSelection). At
// most one Retrieve is in flight: sequences due meanwhile queue and go together in the next one.
// A sequence due again while it still queues is counted as skipped and retrieves once, with its
// latest window.
//
// Ordering with the engine: the ring half of a window is overwritten from the sequence's next due
// step on. A queued sequence has not been read yet: when it is taken, it reads its latest window,
// intact until its next due step. A taken sequence's window is copied out (BuildRetrieval) before
// the Submit of its next due step returns; that Submit waits for the copy (normally long done).
// Before each Retrieve, every copy that read the regions of the sequence's previous reply
// completed (WaitSegmentReads): the server reuses them once the Retrieve arrives.
//
// Thread-safety: Submit, WaitIdle, TakeError and stats from any thread; Submit from one at a
// time (Client::Step holds the client's lock).
#ifndef KVSTAR_CLIENT_RETRIEVAL_SCHEDULER_H_
#define KVSTAR_CLIENT_RETRIEVAL_SCHEDULER_H_

#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "client/data_plane.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/client.h"
#include "kvstar/v1/kvstar.grpc.pb.h"

namespace kvstar::client_internal {

class SequenceImpl;

class RetrievalScheduler {
 public:
  // What the scheduler needs from its client: the channel and the data plane.
  class Channel {
   public:
    virtual ~Channel() = default;
    virtual std::shared_ptr<v1::KvStore::Stub> stub() const = 0;
    // Deadline and credentials of one call.
    virtual void PrepareContext(grpc::ClientContext* context) const = 0;
    // The data plane to use now, choosing it when none is chosen. `ask_again`: a reply named a
    // segment this client has not mapped (the server restarted): ask the server again. An error
    // when the choice failed and shared memory was required.
    virtual absl::StatusOr<std::shared_ptr<const BlockDataPlane>> DataPlaneForRetrieval(
        bool ask_again) = 0;
  };

  // Starts the background thread. REQUIRES: `channel` outlives the scheduler.
  explicit RetrievalScheduler(Channel* channel);
  // Stops the thread; a Retrieve in flight runs to its end first (bounded by its deadline).
  ~RetrievalScheduler();
  RetrievalScheduler(const RetrievalScheduler&) = delete;
  RetrievalScheduler& operator=(const RetrievalScheduler&) = delete;

  // Queues `due` (sequences at a due step, alive until Forget) for the background thread; one
  // already queued is counted as skipped.
  void Submit(std::vector<SequenceImpl*> due);
  // Takes `sequence` out of the queue and waits until no retrieval that holds it is in flight:
  // it may be destroyed then, if no later Submit names it.
  void Forget(SequenceImpl* sequence);
  // Waits until nothing is queued or in flight.
  void WaitIdle();
  // The first retrieval error since the last call (OK when none).
  absl::Status TakeError();
  ClientStats stats() const;

 private:
  void Loop();
  absl::Status Run(const std::vector<SequenceImpl*>& due);

  Channel* const channel_;
  mutable absl::Mutex mu_;
  // Due, not yet taken, in the order they became due.
  std::vector<SequenceImpl*> queue_ ABSL_GUARDED_BY(mu_);
  // The Retrieve being built or read; its sequences whose windows are not copied out yet.
  std::vector<SequenceImpl*> in_flight_ ABSL_GUARDED_BY(mu_);
  std::vector<SequenceImpl*> snapshot_pending_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  ClientStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_RETRIEVAL_SCHEDULER_H_
