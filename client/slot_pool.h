// SlotPool: device memory cut into equal slots (K then V of one block of one layer), shared by
// every sequence and layer that joins it. Slot s starts at base() + s * slot_bytes().
//
// Accounting. A holder (one sequence) joins with a reservation: the slots its resident set needs
// at its longest. Reservations are guaranteed: a holder may always hold up to its reservation.
// Every unreserved slot is headroom (at least `headroom_slots`: Join never reserves into those):
// any holder may hold more than its reservation (new blocks loading while the old ones are still
// read) by drawing on the headroom, first come first served, until it is used up. Take then fails
// with RESOURCE_EXHAUSTED, naming the holder and the counts: the caller drops that load, nothing
// is overwritten. Leave returns a holder's reservation, so the slots of a sequence that left
// serve the others as headroom, or a new sequence's reservation.
//
// Invariant (DCHECKed): sum over holders of max(0, held - reserved) <= num_slots - reserved, so
// the free slots always cover every holder's unused reservation.
//
// Thread-safe.
#ifndef KVSTAR_CLIENT_SLOT_POOL_H_
#define KVSTAR_CLIENT_SLOT_POOL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/device_backend.h"
#include "kvstar/client.h"

namespace kvstar::client_internal {

class SlotPool {
 public:
  using HolderId = uint64_t;

  // A pool of `options.num_slots` slots of `options.slot_bytes`, `options.headroom_slots` of them
  // unreserved. Over `options.memory` when set (the engine's; at least num_slots * slot_bytes
  // bytes, outliving the pool), else allocated with backend->AllocDevice. INVALID_ARGUMENT for
  // zero sizes, headroom above num_slots or memory too small; the allocation's error otherwise.
  static absl::StatusOr<std::shared_ptr<SlotPool>> Create(DeviceBackend* backend,
                                                          const SlotPoolOptions& options);
  ~SlotPool();  // frees memory it allocated. REQUIRES: every holder left.
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  void* base() const { return base_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint64_t num_slots() const { return num_slots_; }
  // REQUIRES: 0 <= slot < num_slots() (DCHECKed).
  char* SlotAddress(int32_t slot) const;

  // Registers a holder named `name` (for messages) with `reserved_slots` guaranteed.
  // RESOURCE_EXHAUSTED when the reservations would eat into the headroom_slots kept unreserved,
  // or into headroom other holders use now.
  absl::StatusOr<HolderId> Join(const std::string& name, uint64_t reserved_slots);
  // Returns the holder's slots and reservation. REQUIRES: nothing reads or writes its slots any
  // more; `holder` joined and did not leave (DCHECKed).
  void Leave(HolderId holder);

  // Appends `count` free slots to *slots (lowest first, so fresh loads coalesce), within the
  // holder's reservation or from the headroom. RESOURCE_EXHAUSTED when the headroom cannot cover
  // the excess; nothing is taken then. NOT_FOUND for an unknown holder.
  absl::Status Take(HolderId holder, size_t count, std::vector<int32_t>* slots);
  // Gives slots back. REQUIRES: `holder` holds them (DCHECKed; others are ignored).
  void Give(HolderId holder, absl::Span<const int32_t> slots);

  SlotPoolStats stats() const;
  // Slots `holder` holds now and at most so far; reserved.
  struct HolderStats {
    uint64_t reserved_slots = 0;
    uint64_t slots_held = 0;
    uint64_t peak_slots_held = 0;
  };
  HolderStats holder_stats(HolderId holder) const;

 private:
  struct Holder {
    std::string name;
    uint64_t reserved = 0;
    uint64_t held = 0;
    uint64_t peak_held = 0;
  };
  SlotPool(DeviceBackend* backend, const SlotPoolOptions& options, void* base, bool owns_memory);
  static uint64_t Excess(const Holder& holder, uint64_t held) {
    return held > holder.reserved ? held - holder.reserved : 0;
  }

  DeviceBackend* const backend_;
  void* const base_;
  const bool owns_memory_;
  const uint64_t slot_bytes_;
  const uint64_t num_slots_;
  const uint64_t headroom_slots_;

  mutable absl::Mutex mu_;
  std::set<int32_t> free_ ABSL_GUARDED_BY(mu_);
  std::map<HolderId, Holder> holders_ ABSL_GUARDED_BY(mu_);
  HolderId next_holder_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t headroom_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t peak_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t peak_headroom_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t takes_refused_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvstar::client_internal

#endif  // KVSTAR_CLIENT_SLOT_POOL_H_
