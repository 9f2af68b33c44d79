// StorageNode: the storage node's core, without gRPC. It keeps the tenant-scoped sequences over a
// BlockStore, batches PutBlocks streams into durable store writes, seals sequences (builds their
// representations), scores retrievals and hands replies to a sink, reads blocks back, drops
// sequences and counts what it did. server/kvstore_service.cc is a thin gRPC edge over it;
// tests call it in-process.
//
// Inputs are the kvstar.v1 messages the sequence's metadata is stored as (profiles, configs,
// queries); outputs are plain structs. Errors are absl::Status values whose messages name the
// bad field and its value.
//
// Thread-safe: any method may be called from any thread concurrently. The node-wide lock guards
// only the map of sequences and is never held across a store call; each sequence has its own
// lock, held by the calls that read or change its retrieval state (Seal, Retrieve, Drop).
#ifndef KVSTAR_SERVER_STORAGE_NODE_H_
#define KVSTAR_SERVER_STORAGE_NODE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstar/v1/kvstar.pb.h"
#include "retrieval/representation.h"
#include "retrieval/retriever.h"
#include "server/tenant_segments.h"
#include "storage/block_store.h"

namespace kvstar::server {

// Without authentication every caller is this tenant.
inline constexpr absl::string_view kDefaultTenant = "default";

struct NodeOptions {
  // Block bytes per reply handed to a sink (GetBlocks, Retrieve); a reply always carries at least
  // one block.
  uint64_t max_reply_bytes = 3 << 20;
  // Threads that score retrievals; 0 means one per hardware thread.
  size_t retrieval_threads = 0;
  // Threads (the calling one included) that copy retrieved blocks into a tenant's shared memory
  // and zero a dropped sequence's regions; 0 means one per hardware thread. One thread moves
  // about 5 GB/s, and a retrieval's new blocks can be over a GB.
  size_t copy_threads = 0;
  // Each tenant's segment for its co-located clients' shared-memory replies; null: none (bytes
  // in replies). A tenant's replies use its own segment only, once a client received it.
  // Not owned; must outlive the node.
  TenantSegments* shared_memory = nullptr;
  // Consecutive blocks of one sequence in one put stream are written to the store together, up
  // to this many bytes: each store write is durable (an fsync).
  uint64_t put_batch_bytes = 32 << 20;
  // Keep each stored block of a tenant that holds a segment in that segment too, as it is put
  // (while the segment keeps an eighth free for replies' regions), so that Retrieve names it
  // where it lies instead of copying it there: the retrieval's host-memory traffic falls from
  // three bytes per delivered byte (read the store, write the segment, the GPU's read) to one.
  // The segment's bytes come on top of the store's (the memory backend holds each block twice);
  // blocks put before a client received the segment, or beyond its room, are copied as before.
  bool segment_resident_blocks = false;
};

struct CreateResult {
  v1::ModelProfile profile;  // normalized: defaults filled in
  v1::KvstarConfig config;
  bool created = false;  // false: it existed with the same profile and config
};

// A block of a Retrieve reply that travels in the tenant's shared-memory segment.
struct SharedBlockRef {
  storage::BlockId id;
  uint64_t checksum = 0;
  uint64_t offset = 0;      // of K in the segment; V follows
  uint64_t key_length = 0;  // bytes of K (equally of V)
};

// One reply of a Retrieve: a layer's selection, then (when data was asked for) the selected blocks
// the client does not hold, in one or more replies of at most max_reply_bytes each.
struct RetrievedLayer {
  size_t request = 0;  // index of the sequence in the Retrieve batch
  uint32_t layer = 0;
  std::vector<uint32_t> selected;
  std::vector<storage::BlockData> blocks;
  std::vector<SharedBlockRef> shared_blocks;
  std::string shared_segment;  // id of the segment shared_blocks lie in
  bool more = false;           // another reply of this layer follows
};

// Receives replies in order. Returns false when the receiver went away: the call then stops.
using RetrieveSink = std::function<bool(RetrievedLayer&)>;
using BlockSink = std::function<bool(std::vector<storage::BlockData>&)>;

struct SealResult {
  uint32_t num_blocks = 0;                        // per layer
  std::vector<std::vector<uint32_t>> selections;  // per layer
};

struct NodeStats {
  uint64_t sequences = 0;
  std::vector<storage::TierStats> tiers;
  uint64_t blocks_put = 0;
  uint64_t blocks_got = 0;
  uint64_t retrievals = 0;
  uint64_t blocks_scored = 0;
  uint64_t blocks_sent = 0;
  uint64_t blocks_skipped_held = 0;
  uint64_t blocks_sent_shared = 0;
  // Where Retrieve calls spent their wall time, summed over them (microseconds): in all, from the
  // batch's locks to the last reply; scoring (the scoring thread, overlapping what follows);
  // and on the sending thread: waiting for scored layers, reading new blocks from the store
  // (with their segment regions' allocation), copying them into the segment, and handing
  // replies to gRPC (which waits for a slow reader).
  uint64_t retrieve_micros = 0;
  uint64_t retrieve_score_micros = 0;
  uint64_t retrieve_wait_micros = 0;
  uint64_t retrieve_read_micros = 0;
  uint64_t retrieve_copy_micros = 0;
  uint64_t retrieve_send_micros = 0;
};

// What ListSequences and DescribeSequence report of one sequence.
struct SequenceInfo {
  std::string sequence_id;
  v1::ModelProfile profile;
  v1::KvstarConfig config;
  bool sealed = false;         // Seal built its representations (since this process started)
  uint32_t sealed_blocks = 0;  // blocks per layer the representations hold
  // DescribeSequence only: blocks stored per layer, and their K+V bytes.
  std::vector<uint32_t> blocks_per_layer;
  uint64_t bytes = 0;
};

// Stored sequences are keyed "<tenant>/<sequence_id>": tenants never see each other's ids.
std::string SequenceKey(absl::string_view tenant, absl::string_view sequence_id);

class StorageNode;

// The blocks of one PutBlocks stream. Add checks each message before anything is stored and
// queues it; queued messages of one sequence are written as one durable store batch when the
// batch is full, when a message of another sequence or a repeated block arrives, or on Flush.
// Not thread-safe: one stream drives it from one thread at a time.
class PutStream {
 public:
  // Checks the message's blocks (sequence, shapes, checksums, repeats) and queues them; may write
  // the queued batch first. Errors name the message by its index in the stream.
  absl::Status Add(absl::string_view sequence_id, std::vector<storage::BlockData> blocks);
  // Writes what is queued now (the stream may continue): after the last Add, or to release the
  // queued bytes early.
  absl::Status Flush();

  uint64_t queued_bytes() const { return bytes_; }
  uint64_t blocks_written() const { return blocks_written_; }
  uint64_t bytes_written() const { return bytes_written_; }
  uint64_t messages() const { return messages_; }

 private:
  friend class StorageNode;
  PutStream(StorageNode* node, std::string tenant) : node_(node), tenant_(std::move(tenant)) {}

  StorageNode* const node_;
  const std::string tenant_;
  std::string key_;  // store key of the queued blocks
  std::vector<storage::BlockData> queued_;
  absl::flat_hash_set<storage::BlockId> ids_;
  uint64_t bytes_ = 0;
  uint64_t first_message_ = 0;  // index of the first queued message
  uint64_t last_message_ = 0;   // index of the last queued message
  uint64_t messages_ = 0;       // messages added so far
  uint64_t blocks_written_ = 0;
  uint64_t bytes_written_ = 0;
};

class StorageNode {
 public:
  // Loads every stored sequence's profile from `store`, which must outlive the node.
  static absl::StatusOr<std::unique_ptr<StorageNode>> Create(storage::BlockStore* store,
                                                             NodeOptions options);

  // Creates a sequence, or finds it with the same profile and config (idempotent); ALREADY_EXISTS
  // when it exists with different ones. Durable on OK.
  absl::StatusOr<CreateResult> CreateSequence(absl::string_view tenant,
                                              absl::string_view sequence_id,
                                              const v1::ModelProfile& profile,
                                              const v1::KvstarConfig& config);

  std::unique_ptr<PutStream> NewPutStream(absl::string_view tenant);

  // Builds the sequence's representations from its stored blocks (every layer must hold blocks
  // 0..n-1, the same n) and returns the first selection. Sealing again rebuilds them.
  absl::StatusOr<SealResult> Seal(absl::string_view tenant, const v1::SealRequest& request);

  // Scores a batch of sequences and hands each layer's reply to `sink` as soon as it is scored.
  // Blocks stored after Seal (decode-generated) join the representations first. Representations
  // live in memory: after a restart, Retrieve answers FAILED_PRECONDITION until the sequence is
  // sealed again. `cancelled` is polled; true stops the call with CANCELLED.
  absl::Status Retrieve(absl::string_view tenant, const v1::RetrieveRequest& request,
                        const RetrieveSink& sink, const std::function<bool()>& cancelled);

  // Reads the given blocks (all of the sequence when `ids` is empty) in replies of at most
  // max_reply_bytes each.
  absl::Status GetBlocks(absl::string_view tenant, absl::string_view sequence_id,
                         absl::Span<const storage::BlockId> ids, const BlockSink& sink);

  // Deletes the sequence and its blocks. Other sequences' calls proceed while the store drops it;
  // calls on this sequence that start meanwhile find it NOT_FOUND.
  absl::StatusOr<storage::DropResult> DropSequence(absl::string_view tenant,
                                                   absl::string_view sequence_id);

  // The whole node's counters and tiers (an admin's view).
  NodeStats Stats();
  // One tenant's view: its sequences and the counters of its own calls; no tiers, which hold
  // every tenant's blocks.
  NodeStats TenantStats(absl::string_view tenant);
  // Live sequences per tenant (tenants with none are absent).
  std::map<std::string, uint64_t> SequencesPerTenant() const;

  // The tenant's live sequences, sorted by id (no per-layer block counts: no store reads).
  std::vector<SequenceInfo> ListSequences(absl::string_view tenant) const;
  // One sequence with its stored blocks per layer (one ListBlocks of the store). NOT_FOUND for
  // an id the tenant does not hold.
  absl::StatusOr<SequenceInfo> DescribeSequence(absl::string_view tenant,
                                                absl::string_view sequence_id);

  TenantSegments* shared_memory() const { return options_.shared_memory; }

 private:
  friend class PutStream;

  // The counters of Stats, kept for the node and for each tenant.
  struct Counters {
    std::atomic<uint64_t> blocks_put{0};
    std::atomic<uint64_t> blocks_got{0};
    std::atomic<uint64_t> retrievals{0};
    std::atomic<uint64_t> blocks_scored{0};
    std::atomic<uint64_t> blocks_sent{0};
    std::atomic<uint64_t> blocks_skipped_held{0};
    std::atomic<uint64_t> blocks_sent_shared{0};
    std::atomic<uint64_t> retrieve_micros{0};
    std::atomic<uint64_t> retrieve_score_micros{0};
    std::atomic<uint64_t> retrieve_wait_micros{0};
    std::atomic<uint64_t> retrieve_read_micros{0};
    std::atomic<uint64_t> retrieve_copy_micros{0};
    std::atomic<uint64_t> retrieve_send_micros{0};
  };

  // One stored sequence. profile and config never change after creation; the retrieval state is
  // guarded by the sequence's own mutex so calls on different sequences never contend.
  struct Sequence {
    Sequence(std::string owner, const v1::CreateSequenceRequest& record, Counters* tenant_counters)
        : key(SequenceKey(owner, record.sequence_id())),
          tenant(std::move(owner)),
          id(record.sequence_id()),
          counters(tenant_counters),
          profile(record.profile()),
          config(record.config()) {}

    const std::string key;  // "<tenant>/<id>", the store's key
    const std::string tenant;
    const std::string id;
    Counters* const counters;  // the tenant's (StorageNode::TenantCounters)
    const v1::ModelProfile profile;
    const v1::KvstarConfig config;
    // Tags the segment regions this sequence released uncleared (SharedMemoryArena::Release), so
    // that its drop can zero those nobody reused. Unique in the node's life, never 0.
    const uint64_t segment_owner = NextSegmentOwner();

    static uint64_t NextSegmentOwner() {
      static std::atomic<uint64_t> next{1};
      return next.fetch_add(1, std::memory_order_relaxed);
    }

    // Held by the call that creates or drops the sequence in the store, so that a concurrent
    // Create of the same id waits for the store's answer instead of racing it.
    absl::Mutex lifecycle_mu;
    // kChanging: being created or dropped in the store.
    enum class State { kChanging, kLive, kGone };
    State state ABSL_GUARDED_BY(lifecycle_mu) = State::kChanging;
    bool Settled() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(lifecycle_mu) {
      return state == State::kLive || state == State::kGone;
    }
    // Mirrors state == kLive for readers that do not take lifecycle_mu.
    std::atomic<bool> live{false};

    absl::Mutex mu;
    // Built by Seal; null before.
    std::unique_ptr<retrieval::SequenceIndex> index ABSL_GUARDED_BY(mu);
    // Mirror the index (sealed, blocks per layer it holds) for readers that must not wait for
    // mu, which a Seal or Retrieve holds while it scores (ListSequences, DescribeSequence).
    std::atomic<bool> sealed{false};
    std::atomic<uint32_t> sealed_blocks{0};
    // Decode step of the last accepted Retrieve; steps must not go backwards.
    uint64_t last_decode_step ABSL_GUARDED_BY(mu) = 0;
    // Regions of the tenant's segment that the last Retrieve's replies named; released by the
    // next one, zeroed by Drop.
    std::vector<uint64_t> shared_regions ABSL_GUARDED_BY(mu);

    // Blocks kept in the tenant's segment as they were put (NodeOptions::segment_resident_blocks):
    // Retrieve names their regions instead of copying. A block put again gets a new region; the
    // old one may still be read through an earlier reply, so it retires and is released by the
    // next Retrieve (the client asks again only once it read the earlier replies' regions).
    // Drop closes the set and zeroes all of it. Lock order: mu, then resident_mu.
    struct ResidentBlock {
      uint64_t offset = 0;
      uint64_t checksum = 0;
    };
    absl::Mutex resident_mu ABSL_ACQUIRED_AFTER(mu);
    absl::flat_hash_map<storage::BlockId, ResidentBlock> resident ABSL_GUARDED_BY(resident_mu);
    std::vector<uint64_t> retired ABSL_GUARDED_BY(resident_mu);
    bool resident_closed ABSL_GUARDED_BY(resident_mu) = false;
  };

  StorageNode(storage::BlockStore* store, NodeOptions options);

  // The live sequence, or NOT_FOUND naming it.
  absl::StatusOr<std::shared_ptr<Sequence>> Find(absl::string_view tenant,
                                                 absl::string_view sequence_id) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // Checks one PutBlocks message's blocks against the sequence without storing anything.
  absl::Status CheckBlocks(const Sequence& sequence,
                           absl::Span<const storage::BlockData> blocks) const;
  // Writes a put stream's queued blocks as one store batch and clears them.
  absl::Status FlushPut(PutStream& stream);
  // Writes each block's K then V into its region of `arena` (the paired offset) in one pass over
  // the copy threads, with streaming stores.
  void WriteRegions(SharedMemoryArena& arena,
                    absl::Span<const std::pair<uint64_t, const storage::BlockData*>> regions);
  // Copies just-stored blocks of the sequence into its tenant's segment and records them
  // (NodeOptions::segment_resident_blocks); those the segment has no room for stay out.
  void KeepInSegment(Sequence& sequence, absl::Span<const storage::BlockData> blocks)
      ABSL_LOCKS_EXCLUDED(sequence.resident_mu);
  // Appends stored blocks beyond what the index holds (decode-generated blocks) to the index.
  absl::Status CatchUp(Sequence& sequence) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sequence.mu);
  // Checks and orders one request's queries by layer: every layer exactly once, same count.
  absl::StatusOr<retrieval::RetrievalRequest> ToRetrievalRequest(
      const Sequence& sequence, const retrieval::SequenceIndex* index,
      const google::protobuf::RepeatedPtrField<v1::LayerQueries>& queries, uint32_t max_queries,
      absl::string_view where) const;
  // A Retrieve's sending thread's time by phase (NodeStats::retrieve_*_micros).
  struct SendTimes {
    absl::Duration read, copy, send;
  };
  // Hands one scored layer to the sink: its selection and the selected blocks not held.
  absl::Status SendLayer(const v1::SequenceQueries& part, size_t request, Sequence& sequence,
                         uint32_t layer, const std::vector<uint32_t>& selected,
                         const absl::flat_hash_set<uint32_t>& held, const RetrieveSink& sink,
                         SendTimes* times) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sequence.mu);
  // Gives the regions of the sequence's last reply back to its tenant's segment; `zero` when
  // their bytes must not be read again (the sequence is dropped): then every region it released
  // before and nobody reused is zeroed too.
  void FreeSharedRegions(Sequence& sequence, bool zero) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sequence.mu);

  storage::BlockStore* const store_;
  const NodeOptions options_;
  retrieval::Retriever retriever_;
  retrieval::ThreadPool copy_pool_;

  mutable absl::Mutex mu_;
  // Sequence key (tenant-scoped id) -> sequence, including ones being created or dropped.
  absl::flat_hash_map<std::string, std::shared_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);

  // The tenant's counters, made on first use; the reference stays valid for the node's life.
  Counters& TenantCounters(absl::string_view tenant) ABSL_LOCKS_EXCLUDED(counters_mu_);
  // Adds `n` to the node's `field` and to the tenant's.
  void Count(Counters& tenant, std::atomic<uint64_t> Counters::*field, uint64_t n);
  static NodeStats Read(const Counters& counters);
  static SequenceInfo Describe(const Sequence& sequence);

  Counters node_counters_;
  mutable absl::Mutex counters_mu_;
  // Tenant -> its counters; entries are never removed, so references stay valid.
  absl::flat_hash_map<std::string, std::unique_ptr<Counters>> tenant_counters_
      ABSL_GUARDED_BY(counters_mu_);
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_STORAGE_NODE_H_
