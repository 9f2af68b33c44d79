// ResidentSet: which blocks of one sequence sit in which slots of its SlotPool, layer by layer,
// and the double-buffered slot tables the attention kernels read.
//
// The guarantees kvstar/client.h promises live here:
// - A selection whose copies are issued is pending; it becomes the visible table only at a step
//   boundary (PublishReady) after its load event completed, and only when the other table buffer
//   is not being read. Between two boundaries every Acquire returns the same table.
// - A slot that leaves the visible table is retired, not freed: it goes back to the pool only once
//   the table that showed it was released and its release event completed (or a newer table was
//   published into that buffer). A slot that was never visible goes back at once.
// - Decode-generated blocks join the tables at the first boundary after their copy completed.
//
// Thread-compatible: the owning sequence's mutex guards every call (SequenceImpl::mu_).
#ifndef KVSTAR_CLIENT_RESIDENT_SET_H_
#define KVSTAR_CLIENT_RESIDENT_SET_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/device_backend.h"
#include "client/slot_pool.h"
#include "kvstar/client.h"

namespace kvstar::client_internal {

// A selection whose new blocks are being copied into slots; published at a step boundary.
struct PendingSelection {
  std::vector<uint32_t> blocks;  // the server's selection, ascending
  uint32_t known_blocks = 0;     // the layer's block count when the selection was asked for
  uint64_t selection_step = 0;
  std::vector<uint32_t> new_blocks;  // blocks copied for it (a subset of blocks)
  EventHandle load_event = nullptr;
  // What its copies read from (a mapped segment): kept alive at least until load_event completed.
  std::shared_ptr<const void> source;
};

class ResidentSet {
 public:
  // Joins `pool` as `name` with `reserved_slots` and allocates the tables: 2 buffers per layer of
  // `table_capacity` entries. `layer_slot_cap`: when > 0, a layer never holds more slots than
  // that (a sequence's own pool, sized per layer). Errors: the pool's Join, allocations.
  static absl::StatusOr<std::unique_ptr<ResidentSet>> Create(
      DeviceBackend* backend, std::shared_ptr<SlotPool> pool, const std::string& name,
      uint64_t reserved_slots, uint32_t num_layers, uint32_t table_capacity,
      uint32_t layer_slot_cap);
  // Waits for every read and copy of its slots, gives them back and leaves the pool.
  ~ResidentSet();
  ResidentSet(const ResidentSet&) = delete;
  ResidentSet& operator=(const ResidentSet&) = delete;

  char* SlotAddress(int32_t slot) const { return pool_->SlotAddress(slot); }
  uint32_t table_capacity() const { return table_capacity_; }
  SlotPool::HolderStats pool_stats() const { return pool_->holder_stats(holder_); }

  // --- Blocks of a layer (REQUIRES for all: layer < num_layers, DCHECKed) ---
  // Blocks the sequence knows of (prompt + appended).
  uint32_t num_blocks(uint32_t layer) const { return layers_[layer].num_blocks; }
  void NoteBlocks(uint32_t layer, uint32_t count);
  // Blocks of `blocks` that hold no slot (visible, pending or appended).
  std::vector<uint32_t> NotResident(uint32_t layer, const std::vector<uint32_t>& blocks) const;
  // Every block holding a slot, ascending (what a Retrieve says the client holds).
  std::vector<uint32_t> Held(uint32_t layer) const;

  // --- Slots ---
  // Takes `count` slots for `layer` (after giving back retired ones whose readers finished).
  // RESOURCE_EXHAUSTED from the pool, or when the layer's cap would be passed.
  absl::Status TakeSlots(uint32_t layer, size_t count, std::vector<int32_t>* slots);
  void GiveSlots(absl::Span<const int32_t> slots) { pool_->Give(holder_, slots); }
  // Gives retired slots of `layer` whose readers finished back to the pool.
  void ReclaimRetired(uint32_t layer);

  // --- Loading ---
  // A decode block copied into `slot` (event `copied`); takes the layer's next block index.
  uint32_t AppendBlock(uint32_t layer, int32_t slot, EventHandle copied);
  // Makes `pending` (whose new blocks' copies are issued into `slots`) the layer's pending
  // selection, replacing an unpublished one (waiting for its copy).
  void SetPending(uint32_t layer, PendingSelection pending, const std::vector<int32_t>& slots);
  // The pending selection's load event (nullptr when none is pending).
  bool has_pending(uint32_t layer) const { return layers_[layer].pending.has_value(); }
  EventHandle pending_load_event(uint32_t layer) const;

  // --- Step boundary ---
  // Publishes the pending selection if its copy completed (and the other buffer is free), or the
  // decode blocks that became ready. Returns the published selection's query step.
  std::optional<uint64_t> PublishReady(uint32_t layer);

  // --- The engine's reads ---
  // The visible table of `layer`; the device copy is written on `stream` if it changed.
  // FAILED_PRECONDITION when the layer is already acquired.
  absl::StatusOr<SlotTable> Acquire(uint32_t layer, StreamHandle stream);
  // FAILED_PRECONDITION when the layer is not acquired.
  absl::Status Release(uint32_t layer, StreamHandle stream);

 private:
  // One slot table of one layer (one half of the double buffer).
  struct TableBuffer {
    std::vector<uint32_t> blocks;     // ascending
    std::vector<int32_t> slots;       // slot of blocks[i]
    int32_t* pinned_slots = nullptr;  // pinned mirror, source of the device copy
    int32_t* device_slots = nullptr;  // what kernels read
    uint64_t generation = 0;          // bumped on each publish into this buffer
    uint64_t selection_step = 0;
    bool device_dirty = false;  // device_slots must be rewritten at the next Acquire
    bool acquired = false;      // acquired and not yet released
    EventHandle release_event = nullptr;
  };
  // A slot that left the resident set; reusable once nothing can still read (or write) it.
  struct RetiredSlot {
    int32_t slot = -1;
    int table = -1;           // table buffer that held it, or -1: wait for `event` instead
    uint64_t generation = 0;  // that buffer's generation when it held the slot
    EventHandle event = nullptr;
  };
  // A decode-generated block copied into a slot; joins the tables once its copy completed.
  struct AppendedBlock {
    uint32_t block = 0;
    EventHandle event = nullptr;
  };
  struct LayerState {
    TableBuffer tables[2];
    int visible = 0;
    int acquired_table = -1;
    uint32_t num_blocks = 0;
    std::map<uint32_t, int32_t> resident;  // block -> slot: visible, pending and appended blocks
    std::vector<RetiredSlot> retired;
    std::optional<PendingSelection> pending;
    std::vector<AppendedBlock> appended_unready;
    std::set<uint32_t> appended_ready;
    std::vector<uint32_t> visible_selection;  // the selection behind the visible table
    uint32_t visible_known_blocks = 0;
  };

  ResidentSet(DeviceBackend* backend, std::shared_ptr<SlotPool> pool, SlotPool::HolderId holder,
              uint32_t num_layers, uint32_t table_capacity, uint32_t layer_slot_cap);
  bool ReadDone(const TableBuffer& table);
  // Makes selection ∪ (appended blocks >= known_blocks) the visible table. False when the other
  // buffer is still being read (try again at the next boundary).
  bool Publish(LayerState& state, const std::vector<uint32_t>& selection, uint32_t known_blocks,
               uint64_t selection_step);
  void DropPending(LayerState& state, const std::set<uint32_t>& keep);

  DeviceBackend* const backend_;
  const std::shared_ptr<SlotPool> pool_;
  const SlotPool::HolderId holder_;
  const uint32_t table_capacity_;
  const uint32_t layer_slot_cap_;
  int32_t* device_tables_ = nullptr;  // 2 * num_layers * table_capacity_ entries
  int32_t* pinned_tables_ = nullptr;
  std::vector<LayerState> layers_;
};

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_RESIDENT_SET_H_
