// Implementation classes behind kvstar/client.h. ClientImpl owns the channel, the backend, the
// staging pool, the shared slot pool, the offload thread, the retrieval scheduler, the data plane
// and the sequences; SequenceImpl owns
// one sequence's resident set (ResidentSet: slots and tables) and query ring.
//
// Lock order: ClientImpl::resolve_mu_ before ClientImpl::mu_ before RetrievalScheduler::mu_ before
// SequenceImpl::mu_ (the scheduler calls sequences holding none of its own). No lock is
// held across an RPC, except resolve_mu_, which serializes choices of the data plane
// (GetServerInfo) between CreateSequence and the retrieval thread.
#ifndef KVSTAR_CLIENT_CLIENT_IMPL_H_
#define KVSTAR_CLIENT_CLIENT_IMPL_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "client/data_plane.h"
#include "client/device_backend.h"
#include "client/resident_set.h"
#include "client/retrieval_scheduler.h"
#include "client/shared_segment.h"
#include "client/slot_pool.h"
#include "client/staging_pool.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/client.h"
#include "kvstar/v1/kvstar.grpc.pb.h"

namespace kvstar::client_internal {

class ClientImpl;

class SequenceImpl : public Sequence {
 public:
  SequenceImpl(ClientImpl* client, std::string id, ModelProfile profile, KvstarConfig config);
  ~SequenceImpl() override;

  // Joins `shared_pool` (or, when null, creates a pool of its own), allocates tables and the
  // query ring.
  absl::Status Init(const SequenceOptions& options, std::shared_ptr<SlotPool> shared_pool);

  const std::string& id() const override { return id_; }
  const ModelProfile& profile() const override { return profile_; }
  const KvstarConfig& config() const override { return config_; }

  absl::Status Offload(uint32_t layer, uint32_t block_index, const void* key, const void* value,
                       MemoryKind where, void* stream) override;
  absl::Status AppendBlock(uint32_t layer, const void* key, const void* value, MemoryKind where,
                           void* stream) override;
  absl::Status Flush() override;
  absl::Status Seal(const void* queries, uint32_t num_queries, MemoryKind where,
                    void* stream) override;
  absl::Status Reseal() override;
  absl::Status RecordQuery(uint32_t layer, const void* query, MemoryKind where,
                           void* stream) override;
  absl::StatusOr<SlotTable> Acquire(uint32_t layer, void* stream) override;
  absl::Status Release(uint32_t layer, void* stream) override;
  SequenceStats stats() const override;

  // --- For ClientImpl ---
  bool sealed() const;
  // The client's step (mod retrieval_stride) at which this sealed sequence is due; the
  // client picks it at Seal (ClientImpl::DueSlotForSeal).
  uint32_t due_slot() const { return due_slot_.load(std::memory_order_relaxed); }
  // Ends the decode step: publishes what is ready. Returns true when a retrieval is due.
  bool AdvanceStep();
  // Appends this sequence's part of a Retrieve (queries of the window that just ended).
  absl::Status BuildRetrieval(v1::SequenceQueries* request, std::vector<uint32_t>* known_blocks);
  // Waits until every copy that read the shared-memory regions of earlier Retrieve replies
  // completed: the server reuses them once the sequence's next Retrieve arrives.
  absl::Status WaitSegmentReads();
  // Loads a selection (from Seal or a Retrieve reply) into slots as this layer's pending selection.
  // Blocks of `data` are located through `plane` (null: gRPC bytes): regions of its segment are
  // copied from there straight into slots, bytes are staged, and blocks it cannot read (regions
  // of another segment) or that did not come are fetched as bytes with GetBlocks.
  absl::Status LoadSelection(uint32_t layer, std::vector<uint32_t> blocks, uint32_t known_blocks,
                             uint64_t selection_step, std::vector<v1::Block> data,
                             std::shared_ptr<const BlockDataPlane> plane);
  // Outcome of a PutBlocks batch of `blocks` of this sequence.
  void OffloadDone(uint64_t blocks, const absl::Status& status);
  // Remembers a background error to surface on the next call.
  void SetError(const absl::Status& status);
  uint64_t slot_bytes() const { return slot_bytes_; }

 private:
  absl::Status TakeError();
  absl::Status CheckLayer(uint32_t layer) const;
  // Stages one block and queues it for the offload thread.
  absl::Status StageAndQueue(uint32_t layer, uint32_t block_index, const void* key,
                             const void* value, MemoryKind where, void* stream);
  char* SlotAddress(int32_t slot) const { return pool_->SlotAddress(slot); }
  // Publishes what is ready in `layer` (ResidentSet::PublishReady) and counts it.
  void PublishReadyLocked(uint32_t layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The query ring and the due steps run on the sequence's clock, step + phase: a window is one
  // ring half, the `retrieval_stride` steps before a due step. The phase in [0, stride) is set
  // at Seal: the sequence is due at the steps s >= stride with (s + phase) % stride == 0.
  uint64_t Clock(uint64_t step) const { return step + phase_.load(std::memory_order_relaxed); }
  char* QueryAddress(uint64_t step, uint32_t layer) const;
  // The latest due step at or before `step` (0 when none: fewer than a whole window recorded).
  uint64_t LastDueStep(uint64_t step) const;
  // Waits for the query copies of the window ending at `end_step` and appends that window's
  // queries of every layer (oldest first) to `queries`.
  absl::Status CollectWindow(uint64_t end_step,
                             google::protobuf::RepeatedPtrField<v1::LayerQueries>* queries);
  // Loads the selections of a Seal reply as pending selections.
  absl::Status LoadSealSelections(const v1::SealResponse& response, uint64_t selection_step);

  ClientImpl* const client_;
  DeviceBackend* const backend_;
  const std::string id_;
  const ModelProfile profile_;
  const KvstarConfig config_;
  std::atomic<uint32_t> phase_{0};  // written by Seal before it publishes sealed_
  std::atomic<uint32_t> due_slot_{0};
  const uint64_t key_bytes_;
  const uint64_t slot_bytes_;
  std::shared_ptr<SlotPool> pool_;     // the one resident_ holds; set by Init, then constant
  uint32_t resident_capacity_ = 0;     // most blocks one table holds (ResidentSet::table_capacity)
  uint32_t max_blocks_per_layer_ = 0;  // 0: unbounded (own pool sized by slots_per_layer)
  char* query_ring_ = nullptr;         // pinned [2 windows][stride][num_layers][query_bytes]
  StreamHandle load_stream_ = nullptr;

  mutable absl::Mutex mu_;
  std::unique_ptr<ResidentSet> resident_ ABSL_GUARDED_BY(mu_);
  bool sealed_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t decode_step_ ABSL_GUARDED_BY(mu_) = 0;
  // The step at which the pending retrieval became due: its query window ends there.
  uint64_t due_step_ ABSL_GUARDED_BY(mu_) = 0;
  EventHandle query_events_[2] ABSL_GUARDED_BY(mu_) = {nullptr, nullptr};
  // Recorded on load_stream_ after the latest copy from the shared-memory segment.
  EventHandle segment_reads_ ABSL_GUARDED_BY(mu_) = nullptr;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  SequenceStats stats_ ABSL_GUARDED_BY(mu_);
};

// One block waiting for the offload thread.
struct OffloadItem {
  SequenceImpl* sequence = nullptr;
  uint32_t layer = 0;
  uint32_t block_index = 0;
  void* staging = nullptr;  // K then V
  uint64_t key_bytes = 0;
  EventHandle ready = nullptr;  // the device->staging copy
};

class ClientImpl : public Client, public RetrievalScheduler::Channel {
 public:
  ClientImpl(const ClientOptions& options, std::unique_ptr<DeviceBackend> backend);
  ~ClientImpl() override;
  absl::Status Init();

  BackendKind backend() const override { return backend_->kind(); }
  DataPlane data_plane() const override;
  absl::Status CreateSlotPool(const SlotPoolOptions& options) override;
  absl::StatusOr<SlotPoolStats> slot_pool_stats() const override;
  // For a sequence sealing now: the client step (mod `stride`) at which it will be due, the one
  // fewest sealed sequences of that stride use (see ClientOptions::stagger_retrievals), and the
  // client's step count now.
  std::pair<uint32_t, uint64_t> DueSlotForSeal(uint32_t stride) const;
  absl::StatusOr<Sequence*> CreateSequence(const std::string& sequence_id,
                                           const ModelProfile& profile, const KvstarConfig& config,
                                           const SequenceOptions& options) override;
  absl::Status DropSequence(const std::string& sequence_id) override;
  absl::Status Step() override;
  absl::Status Flush() override;
  absl::Status Reconnect(const std::string& address) override;
  ClientStats stats() const override;

  // --- For SequenceImpl ---
  DeviceBackend* device() { return backend_.get(); }
  StagingPool* staging() { return staging_.get(); }
  const ClientOptions& options() const { return options_; }
  StreamHandle query_stream() const { return query_stream_; }
  void EnqueueOffload(OffloadItem item);
  // Waits until the offload queue is empty and no batch is in flight.
  void WaitOffloadsIdle();
  absl::StatusOr<v1::SealResponse> SealRpc(const v1::SealRequest& request);
  absl::Status GetBlocksRpc(const std::string& sequence_id, uint32_t layer,
                            const std::vector<uint32_t>& blocks, std::vector<v1::Block>* out);

 private:
  // RetrievalScheduler::Channel.
  std::shared_ptr<v1::KvStore::Stub> stub() const override;
  void PrepareContext(grpc::ClientContext* context) const override;
  absl::StatusOr<std::shared_ptr<const BlockDataPlane>> DataPlaneForRetrieval(
      bool ask_again) override ABSL_LOCKS_EXCLUDED(resolve_mu_, mu_);
  void OffloadLoop();
  absl::Status SendBatch(std::vector<OffloadItem>& batch);
  // Chooses the data plane when none is chosen yet (see ResolveDataPlane).
  absl::Status EnsureDataPlane() ABSL_LOCKS_EXCLUDED(resolve_mu_, mu_);
  // Asks the server (GetServerInfo) and chooses the data plane again, mapping its segment when
  // co-located. An error leaves no plane chosen: the RPC failed, or kSharedMemory was requested
  // and is impossible (FAILED_PRECONDITION with the reason).
  absl::Status ResolveDataPlane() ABSL_LOCKS_EXCLUDED(mu_)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(resolve_mu_);
  // This tenant's segment, received over the server's socket, mapped and registered; nullptr
  // with *why_not set when this client cannot use it; an error when the server could not be
  // asked.
  absl::StatusOr<std::unique_ptr<SharedSegment>> MapServerSegment(std::string* why_not);

  const ClientOptions options_;
  std::unique_ptr<DeviceBackend> backend_;
  std::unique_ptr<StagingPool> staging_;
  StreamHandle query_stream_ = nullptr;

  absl::Mutex resolve_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  // Null until chosen (kAuto).
  std::shared_ptr<const BlockDataPlane> plane_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<grpc::Channel> channel_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<v1::KvStore::Stub> stub_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<SlotPool> slot_pool_ ABSL_GUARDED_BY(mu_);  // shared by sequences; may be null
  std::map<std::string, std::unique_ptr<SequenceImpl>> sequences_ ABSL_GUARDED_BY(mu_);
  uint64_t steps_ ABSL_GUARDED_BY(mu_) = 0;  // Step calls so far
  std::deque<OffloadItem> offload_queue_ ABSL_GUARDED_BY(mu_);
  bool offload_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  std::thread offload_thread_;
  std::unique_ptr<RetrievalScheduler> scheduler_;  // set by Init
};

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_CLIENT_IMPL_H_
