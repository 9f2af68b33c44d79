// kvstar client library: what an inference engine links to keep most of a sequence's KV cache on a
// kvstar storage node and only the blocks that matter in GPU memory.
//
// The engine's view, per sequence:
//   1. Client::Connect, Client::CreateSequence(profile, knobs).
//   2. Prefill: Sequence::Offload every completed prompt block (device or host pointers), then
//      Sequence::Seal with the last prompt queries. Seal returns once the first selection is loaded
//      into device slots and visible.
//   3. Each decode step, for each layer: Acquire(layer) -> the slot table the attention kernel
//   reads,
//      RecordQuery(layer, query), launch attention, Release(layer). When the local window fills a
//      block: AppendBlock (offloads it and keeps it resident). Then, once per step for all
//      sequences, Client::Step().
//   Every retrieval_stride steps Step() hands one Retrieve for all layers of all due sequences to a
//   background thread; replies stream in and their new blocks are copied into free slots. A new
//   selection becomes visible only at a step boundary (a later Step()) after its copies completed,
//   so every Acquire between two Step() calls returns the same table. A slot leaves a table only at
//   a step boundary and is overwritten only after every Release of the tables that held it
//   completed (a CUDA event recorded on the engine's stream; on the host backend, the Release call
//   itself).
//
// Slots. A slot holds K then V of one block of one layer ([block_size][num_kv_heads][head_dim]
// each; `slot_bytes`). Slot s starts at slot_pool + s * slot_bytes: slot ids index the whole pool,
// whatever the layer. Normally one pool is shared by every sequence and layer of the client
// (Client::CreateSlotPool, e.g. over the engine's paged KV pool, a torch tensor): each sequence
// reserves the slots of its resident set at its longest (ReservedSlots), and the pool's headroom,
// shared by all, holds the new blocks of selections still loading while the old ones are read.
// A sequence returns its slots when dropped; slots it stops using return at step boundaries.
// A load holds headroom from its copy until the step boundary after its table's readers released
// the old slots (normally one or two steps), so sequences due on the same step share it: the
// client spreads its sequences' due steps over the stride (ClientOptions::stagger_retrievals),
// and the headroom needs to hold about one step's loads. As a torch
// tensor the pool is [num_slots][2][block_size][num_kv_heads][head_dim]. When the headroom is
// used up, a load fails with RESOURCE_EXHAUSTED (reported by Step) and the
// sequence keeps its visible table: nothing is overwritten. Without a shared pool, a sequence gets
// a pool of its own (SequenceOptions below).
//
// Data planes. Retrieve replies carry new blocks' bytes either in the gRPC messages (remote node)
// or, for a client on the server's host (the co-located sidecar), as regions of its tenant's
// shared-memory segment. The client receives that segment's descriptor on the server's Unix
// socket (GetServerInfo.shared_memory_socket) after the server checked bearer_token, maps it
// read-only (and on CUDA registers it as pinned memory) and copies straight into slots; no other
// tenant's bytes are ever in it, and it has no name anyone could open. Blocks that do not fit the
// segment still come as bytes. Both
// give bit-identical slots. The plane is chosen at the first CreateSequence (see
// ClientOptions::data_plane) and logged with the reason; the Client's destruction unmaps the
// segment. The Retrieve after a reply is sent only once the copies from that reply's regions
// completed: the server reuses them then.
//
// Backends. With a usable CUDA device, slots live in device memory and copies are CUDA async copies
// through pinned staging. When CUDA is unusable at start-up (no device, "driver insufficient", ...)
// and the backend is kAuto, the same code runs on a host-memory backend: "device" pointers are
// plain host memory and copies are memcpy. The choice is logged once per process.
//
// Errors are absl::Status values; nothing throws. Background work reports its first error later:
// offload errors on every Offload/AppendBlock of that sequence until a Flush returns and clears
// them; retrieval and load errors once, on the next Client::Step.
//
// Recovery after the server restarts or the connection drops: calls in flight fail (UNAVAILABLE or
// DEADLINE_EXCEEDED) and the error surfaces as above. Decoding may go on meanwhile: the resident
// set stays valid and Acquire keeps returning it (selections just get stale). Then:
//   - Client::Reconnect(address) if the server moved (plain restarts on the same address reconnect
//   by
//     themselves).
//   - Sequence::Reseal() for every sealed sequence: a restarted server lost its retrieval index
//     (Step reports FAILED_PRECONDITION "not sealed" from the next Retrieve). Later strides then
//     retrieve as before.
//   - Blocks the server acknowledged are durable. Flush() returns an error naming how many blocks
//   were
//     not acknowledged since the last successful Flush; re-Offload those (PutBlocks overwrites, so
//     re-sending a block is harmless). SequenceStats::unacknowledged_blocks counts them.
//
// Thread-safety: Client and Sequence methods may be called from any thread, but the per-step calls
// (RecordQuery, Acquire, Release, Step) are meant for the engine's one decode thread; they take
// short locks and never wait for the network.
#ifndef KVSTAR_CLIENT_INCLUDE_KVSTAR_CLIENT_H_
#define KVSTAR_CLIENT_INCLUDE_KVSTAR_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvstar {

enum class DType : uint32_t { kBf16 = 1, kFp16 = 2, kFp32 = 3 };

// Bytes of one element of `dtype`.
uint32_t DTypeBytes(DType dtype);

// Shape of the model whose KV cache a sequence holds (see ModelProfile in kvstar.proto).
struct ModelProfile {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t block_size = 128;  // tokens per block
  DType dtype = DType::kBf16;

  // Bytes of K (equally of V) of one block of one layer.
  uint64_t block_key_bytes() const;
  // Bytes of one token's queries of one layer: [num_q_heads][head_dim].
  uint64_t query_bytes() const;
};

// The kvstar knobs (see KvstarConfig in kvstar.proto). The defaults are the server's.
struct KvstarConfig {
  uint32_t init_window_sz = 1;
  uint32_t local_window_sz = 2;
  float sparse_ratio = 0.25f;
  uint32_t retrieval_stride = 8;
  float blk_repre_dim_prune_ratio = 0.25f;
  uint32_t blk_repre_inner_token_merge = 2;
  // How a KV head's query rows vote for blocks (BlockVote in kvstar.proto): 0 the sum of their
  // softmax shares (the original algorithm), 1 the largest share.
  uint32_t block_vote = 0;
  // How the node stores block representations (RepresentationFormat in kvstar.proto): 0 bf16
  // (the reference), 1 int8 with a scale per vector.
  uint32_t representation_format = 0;
};

enum class BackendKind : uint32_t { kAuto = 0, kHost = 1, kCuda = 2 };

const char* BackendName(BackendKind kind);

// How Retrieve replies deliver block bytes (see "Data planes" above).
//   kAuto: shared memory when the server runs on this host (its GetServerInfo host_id equals this
//     host's /proc/sys/kernel/random/boot_id) and its tenant's segment can be received over its
//     socket and mapped (and, on CUDA, registered); else gRPC bytes.
//   kSharedMemory: shared memory or CreateSequence fails with FAILED_PRECONDITION saying why.
//   kGrpcBytes: always bytes in the reply.
enum class DataPlane : uint32_t { kAuto = 0, kSharedMemory = 1, kGrpcBytes = 2 };

const char* DataPlaneName(DataPlane plane);

// Where a pointer handed to the library points.
enum class MemoryKind : uint32_t { kHost = 0, kDevice = 1 };

struct ClientOptions {
  std::string address = "127.0.0.1:50051";
  // TLS via grpc::SslCredentials; an empty root bundle uses the system's roots.
  bool use_tls = false;
  std::string tls_root_certs_pem;
  // The client's own certificate chain and key (PEM), for servers that require client
  // certificates (--tls_client_ca_file). Both or neither.
  std::string tls_cert_chain_pem;
  std::string tls_private_key_pem;
  // Sent as "authorization: Bearer <token>" on every call when non-empty.
  std::string bearer_token;
  // kAuto: CUDA when usable, else the host backend. kCuda fails Connect when CUDA is unusable.
  BackendKind backend = BackendKind::kAuto;
  int cuda_device = 0;
  // Pinned host memory for staging offloads and loads. Offload blocks (backpressure) when it is
  // full.
  uint64_t staging_budget_bytes = uint64_t{256} << 20;
  // Deadline of each unary call and of each streaming call as a whole.
  int rpc_timeout_ms = 30000;
  // Largest PutBlocks message the library sends (the server's --max_message_bytes bounds it).
  uint64_t max_message_bytes = uint64_t{4} << 20;
  DataPlane data_plane = DataPlane::kAuto;
  // Check each loaded block's bytes against its XXH3-64 checksum before they reach a slot: a
  // mismatch drops that selection (DATA_LOSS from Step or Seal, the visible table stays). On by
  // default for blocks that arrive as bytes; off by default for blocks read from the server's
  // shared-memory segment (one more pass over host memory per block).
  bool verify_block_checksums = true;
  bool verify_shared_memory_checksums = false;
  // Spread the sequences' retrievals over the stride: each new sequence is due at its own phase
  // of the stride (the one fewest open sequences of that stride use), so a batch's retrievals and
  // loads do not all fall on one step and need headroom for all of them at once. A sequence of
  // phase p > 0 is first due at step 2 * retrieval_stride - p (a whole window after its Seal),
  // then every retrieval_stride steps. False: every sequence is due at multiples of its stride.
  bool stagger_retrievals = true;
};

struct SequenceOptions {
  // Only without a shared pool (INVALID_ARGUMENT with one): the sequence's own pool of
  // num_layers * slots_per_layer slots; 0 picks the resident set for max_blocks_per_layer blocks,
  // doubled so a whole new selection can load while the current one is read, plus 2, per layer.
  uint32_t slots_per_layer = 0;
  // Longest the sequence may grow, in blocks per layer. Required with a shared pool (it sizes the
  // reservation, ReservedSlots; AppendBlock past it fails with OUT_OF_RANGE) and without one when
  // slots_per_layer is 0.
  uint32_t max_blocks_per_layer = 0;
  // Engine-provided memory of that own pool (nullptr: the library allocates it). Must hold
  // num_layers * slots_per_layer * slot_bytes bytes and outlive the sequence.
  void* slot_pool = nullptr;
  uint64_t slot_pool_bytes = 0;
};

// Slots a sequence reserves in a shared pool: per layer, init + local windows plus
// ceil(sparse_ratio * middle blocks) of `max_blocks_per_layer` blocks, times num_layers.
uint64_t ReservedSlots(const ModelProfile& profile, const KvstarConfig& config,
                       uint32_t max_blocks_per_layer);

// One slot pool shared by all sequences of a client (see "Slots" above).
struct SlotPoolOptions {
  // K + V of one block: 2 * profile.block_key_bytes() of every sequence that will use the pool.
  uint64_t slot_bytes = 0;
  // All slots, headroom included.
  uint64_t num_slots = 0;
  // Of num_slots, the ones no sequence may reserve: shared by all for loads in flight. Slots no
  // open sequence reserves (e.g. a dropped sequence's) serve as headroom too.
  uint64_t headroom_slots = 0;
  // The engine's memory (device memory on the CUDA backend, host memory on the host backend), at
  // least num_slots * slot_bytes bytes, outliving the Client; nullptr: the library allocates it.
  void* memory = nullptr;
  uint64_t memory_bytes = 0;
};

// A pool for `max_sequences` sequences of up to `max_blocks_per_layer` blocks: each one's
// ReservedSlots, plus headroom_fraction of them as shared headroom (rounded up).
SlotPoolOptions SlotPoolFor(const ModelProfile& profile, const KvstarConfig& config,
                            uint32_t max_blocks_per_layer, uint32_t max_sequences,
                            double headroom_fraction = 0.1);

struct SlotPoolStats {
  uint64_t slot_bytes = 0;
  uint64_t num_slots = 0;
  uint64_t headroom_slots = 0;     // as configured; the headroom now is num_slots - reserved
  uint64_t reserved_slots = 0;     // reserved by the open sequences
  uint64_t slots_in_use = 0;       // held by sequences (resident, loading or still read)
  uint64_t headroom_in_use = 0;    // held beyond the holders' reservations
  uint64_t peak_slots_in_use = 0;  // since the pool was created
  uint64_t peak_headroom_in_use = 0;
  uint64_t sequences = 0;
  uint64_t takes_refused = 0;  // loads refused for want of headroom
};

// What the attention kernel of one layer reads during one decode step. Valid until the matching
// Release; the device array is not rewritten before the Release's event completed.
struct SlotTable {
  uint32_t layer = 0;
  uint64_t step = 0;                        // the decode step this table serves
  uint32_t count = 0;                       // resident blocks
  const int32_t* device_slots = nullptr;    // [count] slot of each resident block, device memory
  const int32_t* host_slots = nullptr;      // [count] the same, host memory
  const uint32_t* block_indices = nullptr;  // [count] ascending block index, host memory
  void* slot_pool = nullptr;                // base of the pool the slots index (device memory)
  uint64_t slot_bytes = 0;       // K + V of one block: slot s starts at slot_pool + s * slot_bytes
  uint32_t slots_per_layer = 0;  // always 0: slot ids index the whole pool
  // Decode step the queries behind this selection ended at (0 for the Seal selection).
  uint64_t selection_step = 0;
};

struct SequenceStats {
  uint64_t blocks_offloaded = 0;       // acknowledged by the server
  uint64_t unacknowledged_blocks = 0;  // handed to Offload, lost to an error since the last Flush
  uint64_t blocks_loaded = 0;          // new blocks copied into slots (incremental transfer)
  uint64_t bytes_loaded = 0;
  uint64_t blocks_already_resident = 0;  // selected blocks that were resident: not sent, not copied
  uint64_t selections_published = 0;
  uint64_t selections_dropped = 0;    // no free slot or an error while loading it
  uint64_t last_staleness_steps = 0;  // visible step minus the selection's query step
  uint64_t max_staleness_steps = 0;
  uint64_t decode_step = 0;
  uint64_t reserved_slots = 0;  // the sequence's reservation in its pool
  uint64_t slots_held = 0;      // slots it holds now (resident, loading or still read)
  uint64_t peak_slots_held = 0;
};

struct ClientStats {
  uint64_t retrievals_sent = 0;
  // Due again while still queued behind a Retrieve in flight: it retrieves once, with its latest
  // queries.
  uint64_t retrievals_skipped = 0;
  uint64_t retrieve_replies = 0;
  // Retrievals whose replies were all read and their loads issued (or that failed); on the host
  // backend the loads are then complete.
  uint64_t retrievals_completed = 0;
  // New blocks of Retrieve replies, by how their bytes came (all sequences, since Connect).
  uint64_t blocks_received_shared = 0;  // as regions of the tenant's shared-memory segment
  uint64_t blocks_received_bytes = 0;   // as bytes in the reply
  // Where completed retrievals spent their time, summed over them (microseconds of wall time):
  // in all, from taking the due sequences to the last layer's loads issued; waiting, before the
  // call, for the sequences' earlier copies out of the segment (the server reuses those regions
  // once the call arrives); from the call to its first reply (the server's scoring of the first
  // layer, behind any call it serves before); and loading the replies' selections (finding the
  // new blocks' bytes, taking slots, issuing the copies; on the host backend the copies too). The
  // rest is waiting for the server's later replies, and for the call's status after the last one
  // (call_end_micros, counted within that rest).
  uint64_t retrieve_micros = 0;
  uint64_t segment_wait_micros = 0;
  uint64_t first_reply_micros = 0;
  uint64_t load_micros = 0;
  uint64_t call_end_micros = 0;
};

// One sequence. Owned by its Client; valid until DropSequence or the Client's destruction.
class Sequence {
 public:
  virtual ~Sequence() = default;

  virtual const std::string& id() const = 0;
  virtual const ModelProfile& profile() const = 0;
  virtual const KvstarConfig& config() const = 0;

  // Hands over K and V of one completed block (block_key_bytes each). Device pointers are copied to
  // pinned staging on `stream` (a cudaStream_t; nullptr = legacy default), ordered after the work
  // that produced them; host pointers are copied before returning. Either way the caller may reuse
  // its buffers once the stream passes this point (device) or at return (host). Sending happens on
  // a background thread; blocks when the staging budget is full. Returns an earlier background
  // error, or INVALID_ARGUMENT for a layer out of range.
  virtual absl::Status Offload(uint32_t layer, uint32_t block_index, const void* key,
                               const void* value, MemoryKind where, void* stream) = 0;

  // A decode-generated block: Offload plus keep it resident (copied into a free slot on `stream`).
  // It joins the tables at the next step boundary. REQUIRES: Seal succeeded; block_index is the
  // layer's next block.
  virtual absl::Status AppendBlock(uint32_t layer, const void* key, const void* value,
                                   MemoryKind where, void* stream) = 0;

  // Waits until every block offloaded so far is acknowledged. Returns the first error since the
  // last Flush (with the count of blocks not acknowledged).
  virtual absl::Status Flush() = 0;

  // Flushes, then seals the prompt with its last `num_queries` queries of every layer, laid out
  // [num_layers][num_queries][num_q_heads][head_dim]; loads the first selection into slots and
  // makes it visible. Blocking (prefill, not the decode critical path). Errors: the server's Seal
  // status (FAILED_PRECONDITION when blocks are missing, UNIMPLEMENTED on servers without
  // retrieval), or RESOURCE_EXHAUSTED when the selection does not fit the slots.
  virtual absl::Status Seal(const void* queries, uint32_t num_queries, MemoryKind where,
                            void* stream) = 0;

  // Recovery after a server restart: the server's retrieval index is not durable, so Retrieve
  // fails with FAILED_PRECONDITION ("not sealed") until the sequence is sealed again. Reseal seals
  // it again with the last complete window of queries recorded by RecordQuery, keeping the decode
  // step; the resident set stays visible and the new selection is published at the next step
  // boundary. Blocking (RPC + loads): call it between steps. FAILED_PRECONDITION before Seal or
  // before retrieval_stride decode steps were recorded.
  virtual absl::Status Reseal() = 0;

  // Records this decode step's query of `layer` ([num_q_heads][head_dim], one token). Device
  // queries are copied to a pinned buffer on a side stream ordered after `stream`; never blocks.
  virtual absl::Status RecordQuery(uint32_t layer, const void* query, MemoryKind where,
                                   void* stream) = 0;

  // The table for this step. The device table is written on `stream` (if it changed), so kernels
  // on `stream` read it in order. REQUIRES: Seal succeeded. Every Acquire needs a Release.
  virtual absl::StatusOr<SlotTable> Acquire(uint32_t layer, void* stream) = 0;

  // Marks the end of this step's reads of `layer`'s table: an event is recorded on `stream` after
  // the kernels that read it; the table's slots may be reused once it completed.
  virtual absl::Status Release(uint32_t layer, void* stream) = 0;

  virtual SequenceStats stats() const = 0;
};

class Client {
 public:
  virtual ~Client() = default;

  // Picks the backend (logging the choice once), opens the channel. Does not wait for the server.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);

  virtual BackendKind backend() const = 0;

  // The data plane in use: kSharedMemory or kGrpcBytes once chosen, kAuto before (the choice is
  // made by the first CreateSequence, and made again after Reconnect or when the server's segment
  // changed because it restarted).
  virtual DataPlane data_plane() const = 0;

  // Creates the slot pool every later sequence shares (see "Slots" above). FAILED_PRECONDITION
  // when the client already has one or sequences are open; INVALID_ARGUMENT for zero sizes,
  // headroom_slots above num_slots or memory_bytes too small; RESOURCE_EXHAUSTED when the
  // library cannot allocate it.
  virtual absl::Status CreateSlotPool(const SlotPoolOptions& options) = 0;

  // The shared pool's accounting; FAILED_PRECONDITION without one.
  virtual absl::StatusOr<SlotPoolStats> slot_pool_stats() const = 0;

  // Registers a sequence on the server (idempotent for the same profile and knobs) and reserves
  // its slots in the shared pool (or allocates its own pool without one); the first call also
  // chooses the data plane (one GetServerInfo RPC). Errors: the server's (ALREADY_EXISTS for a
  // different profile), INVALID_ARGUMENT for bad options (a profile whose slot bytes differ from
  // the shared pool's, slots_per_layer or slot_pool with a shared pool, no max_blocks_per_layer),
  // RESOURCE_EXHAUSTED when slots cannot be allocated or the shared pool's reservations are full
  // (the message gives the counts), FAILED_PRECONDITION when data_plane is kSharedMemory and the
  // server's segment cannot be used (the message says why).
  virtual absl::StatusOr<Sequence*> CreateSequence(const std::string& sequence_id,
                                                   const ModelProfile& profile,
                                                   const KvstarConfig& config,
                                                   const SequenceOptions& options) = 0;

  // Waits for the sequence's background work and for the reads of its tables (Release events),
  // drops it on the server and returns its slots to the pool (or frees its own pool).
  // REQUIRES: every Acquire of the sequence was Released.
  virtual absl::Status DropSequence(const std::string& sequence_id) = 0;

  // Ends a decode step of every sealed sequence: publishes selections whose copies completed, and
  // hands a Retrieve for the sequences that reached a retrieval_stride boundary to the background
  // thread. Never waits for the network. Returns a background error once.
  virtual absl::Status Step() = 0;

  // Flush() of every sequence.
  virtual absl::Status Flush() = 0;

  // Points the client at another address (a restarted server); the data plane is chosen again at
  // the next CreateSequence or retrieval. Clears nothing else.
  virtual absl::Status Reconnect(const std::string& address) = 0;

  virtual ClientStats stats() const = 0;
};

}  // namespace kvstar

#endif  // KVSTAR_CLIENT_INCLUDE_KVSTAR_CLIENT_H_
