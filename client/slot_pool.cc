// SlotPool: reservations plus shared headroom over one array of slots.
#include "client/slot_pool.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvstar {

uint64_t ReservedSlots(const ModelProfile& profile, const KvstarConfig& config,
                       uint32_t max_blocks_per_layer) {
  const uint64_t windows = uint64_t{config.init_window_sz} + config.local_window_sz;
  const uint64_t middle = max_blocks_per_layer > windows ? max_blocks_per_layer - windows : 0;
  const uint64_t selected =
      static_cast<uint64_t>(std::ceil(static_cast<double>(middle) * config.sparse_ratio));
  const uint64_t per_layer = std::min<uint64_t>(windows + selected, max_blocks_per_layer);
  return per_layer * profile.num_layers;
}

SlotPoolOptions SlotPoolFor(const ModelProfile& profile, const KvstarConfig& config,
                            uint32_t max_blocks_per_layer, uint32_t max_sequences,
                            double headroom_fraction) {
  SlotPoolOptions options;
  options.slot_bytes = 2 * profile.block_key_bytes();
  const uint64_t reserved =
      ReservedSlots(profile, config, max_blocks_per_layer) * uint64_t{max_sequences};
  options.headroom_slots = static_cast<uint64_t>(
      std::ceil(static_cast<double>(reserved) * std::max(0.0, headroom_fraction)));
  options.num_slots = reserved + options.headroom_slots;
  return options;
}

namespace client_internal {

absl::StatusOr<std::shared_ptr<SlotPool>> SlotPool::Create(DeviceBackend* backend,
                                                           const SlotPoolOptions& options) {
  if (options.slot_bytes == 0 || options.num_slots == 0) {
    return absl::InvalidArgumentError(absl::StrCat("slot pool: slot_bytes ", options.slot_bytes,
                                                   " and num_slots ", options.num_slots,
                                                   " must be > 0"));
  }
  if (options.num_slots > uint64_t{INT32_MAX}) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot pool: num_slots ", options.num_slots, " exceeds ", INT32_MAX));
  }
  if (options.headroom_slots > options.num_slots) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slot pool: headroom_slots ", options.headroom_slots, " > num_slots ", options.num_slots));
  }
  const uint64_t bytes = options.num_slots * options.slot_bytes;
  void* base = options.memory;
  bool owns = false;
  if (base != nullptr) {
    if (options.memory_bytes < bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slot pool: memory_bytes ", options.memory_bytes, " < ", bytes, " needed for ",
          options.num_slots, " slots of ", options.slot_bytes, " bytes"));
    }
  } else {
    absl::StatusOr<void*> allocated = backend->AllocDevice(bytes);
    if (!allocated.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat("slot pool of ", options.num_slots,
                                                       " slots (", bytes,
                                                       " bytes): ", allocated.status().message()));
    }
    base = *allocated;
    owns = true;
  }
  return std::shared_ptr<SlotPool>(new SlotPool(backend, options, base, owns));
}

SlotPool::SlotPool(DeviceBackend* backend, const SlotPoolOptions& options, void* base,
                   bool owns_memory)
    : backend_(backend),
      base_(base),
      owns_memory_(owns_memory),
      slot_bytes_(options.slot_bytes),
      num_slots_(options.num_slots),
      headroom_slots_(options.headroom_slots) {
  for (uint64_t slot = 0; slot < num_slots_; ++slot) {
    free_.insert(free_.end(), static_cast<int32_t>(slot));
  }
}

SlotPool::~SlotPool() {
  {
    absl::MutexLock lock(&mu_);
    assert(holders_.empty() && "SlotPool destroyed while sequences hold slots");
  }
  if (owns_memory_) backend_->FreeDevice(base_);
}

char* SlotPool::SlotAddress(int32_t slot) const {
  assert(slot >= 0 && static_cast<uint64_t>(slot) < num_slots_);
  return static_cast<char*>(base_) + static_cast<uint64_t>(slot) * slot_bytes_;
}

absl::StatusOr<SlotPool::HolderId> SlotPool::Join(const std::string& name,
                                                  uint64_t reserved_slots) {
  absl::MutexLock lock(&mu_);
  const uint64_t reservable = num_slots_ - headroom_slots_;
  if (reserved_ + reserved_slots > reservable) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "slot pool: sequence ", name, " needs ", reserved_slots, " reserved slots; ", reserved_,
        " of the pool's ", reservable, " reservable slots are reserved by ", holders_.size(),
        " sequences (", num_slots_, " slots, ", headroom_slots_, " of them headroom)"));
  }
  if (reserved_ + reserved_slots + headroom_in_use_ > num_slots_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "slot pool: sequence ", name, " needs ", reserved_slots, " reserved slots; ",
        headroom_in_use_, " unreserved slots are in use by loads in flight: retry after a Step"));
  }
  const HolderId id = next_holder_++;
  holders_[id] = Holder{name, reserved_slots, 0, 0};
  reserved_ += reserved_slots;
  return id;
}

void SlotPool::Leave(HolderId holder) {
  absl::MutexLock lock(&mu_);
  auto found = holders_.find(holder);
  assert(found != holders_.end());
  if (found == holders_.end()) return;
  assert(found->second.held == 0 && "a sequence left the slot pool holding slots");
  headroom_in_use_ -= Excess(found->second, found->second.held);
  reserved_ -= found->second.reserved;
  holders_.erase(found);
}

absl::Status SlotPool::Take(HolderId holder, size_t count, std::vector<int32_t>* slots) {
  absl::MutexLock lock(&mu_);
  auto found = holders_.find(holder);
  if (found == holders_.end()) {
    return absl::NotFoundError(absl::StrCat("slot pool: holder ", holder, " is not registered"));
  }
  Holder& owner = found->second;
  const uint64_t extra = Excess(owner, owner.held + count) - Excess(owner, owner.held);
  const uint64_t headroom = num_slots_ - reserved_;
  if (headroom_in_use_ + extra > headroom || free_.size() < count) {
    ++takes_refused_;
    return absl::ResourceExhaustedError(absl::StrCat(
        "slot pool exhausted: sequence ", owner.name, " needs ", count, " more slots (holds ",
        owner.held, ", reserved ", owner.reserved, "); shared headroom ", headroom_in_use_, " of ",
        headroom, " in use, ", free_.size(),
        " slots free: loads in flight of other sequences hold it; retry after the next Step, or "
        "give the pool more headroom_slots"));
  }
  for (size_t i = 0; i < count; ++i) {
    slots->push_back(*free_.begin());
    free_.erase(free_.begin());
  }
  owner.held += count;
  owner.peak_held = std::max(owner.peak_held, owner.held);
  headroom_in_use_ += extra;
  peak_in_use_ = std::max<uint64_t>(peak_in_use_, num_slots_ - free_.size());
  peak_headroom_in_use_ = std::max(peak_headroom_in_use_, headroom_in_use_);
  assert(headroom_in_use_ <= num_slots_ - reserved_);
  return absl::OkStatus();
}

void SlotPool::Give(HolderId holder, absl::Span<const int32_t> slots) {
  absl::MutexLock lock(&mu_);
  auto found = holders_.find(holder);
  assert(found != holders_.end());
  if (found == holders_.end()) return;
  Holder& owner = found->second;
  uint64_t given = 0;
  for (int32_t slot : slots) {
    assert(slot >= 0 && static_cast<uint64_t>(slot) < num_slots_);
    if (slot < 0 || static_cast<uint64_t>(slot) >= num_slots_) continue;
    const bool inserted = free_.insert(slot).second;
    assert(inserted && "slot given back twice");
    if (inserted) ++given;
  }
  assert(given <= owner.held);
  given = std::min(given, owner.held);
  headroom_in_use_ -= Excess(owner, owner.held) - Excess(owner, owner.held - given);
  owner.held -= given;
}

SlotPoolStats SlotPool::stats() const {
  absl::MutexLock lock(&mu_);
  SlotPoolStats stats;
  stats.slot_bytes = slot_bytes_;
  stats.num_slots = num_slots_;
  stats.headroom_slots = headroom_slots_;
  stats.reserved_slots = reserved_;
  stats.slots_in_use = num_slots_ - free_.size();
  stats.headroom_in_use = headroom_in_use_;
  stats.peak_slots_in_use = peak_in_use_;
  stats.peak_headroom_in_use = peak_headroom_in_use_;
  stats.sequences = holders_.size();
  stats.takes_refused = takes_refused_;
  return stats;
}

SlotPool::HolderStats SlotPool::holder_stats(HolderId holder) const {
  absl::MutexLock lock(&mu_);
  auto found = holders_.find(holder);
  if (found == holders_.end()) return {};
  return {found->second.reserved, found->second.held, found->second.peak_held};
}

}  // namespace client_internal
}  // namespace kvstar
