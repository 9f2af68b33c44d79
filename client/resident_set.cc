// ResidentSet: slots, retirement and the double-buffered tables of one sequence.
#include "client/resident_set.h"

#include <algorithm>
#include <cassert>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvstar::client_internal {

absl::StatusOr<std::unique_ptr<ResidentSet>> ResidentSet::Create(
    DeviceBackend* backend, std::shared_ptr<SlotPool> pool, const std::string& name,
    uint64_t reserved_slots, uint32_t num_layers, uint32_t table_capacity,
    uint32_t layer_slot_cap) {
  absl::StatusOr<SlotPool::HolderId> holder = pool->Join(name, reserved_slots);
  if (!holder.ok()) return holder.status();
  std::unique_ptr<ResidentSet> set(new ResidentSet(backend, std::move(pool), *holder, num_layers,
                                                   table_capacity, layer_slot_cap));
  const uint64_t entries = uint64_t{2} * num_layers * table_capacity;
  absl::StatusOr<void*> device_tables = backend->AllocDevice(entries * sizeof(int32_t));
  if (!device_tables.ok()) return device_tables.status();
  set->device_tables_ = static_cast<int32_t*>(*device_tables);
  absl::StatusOr<void*> pinned_tables = backend->AllocPinned(entries * sizeof(int32_t));
  if (!pinned_tables.ok()) return pinned_tables.status();
  set->pinned_tables_ = static_cast<int32_t*>(*pinned_tables);
  for (uint32_t layer = 0; layer < num_layers; ++layer) {
    for (int buffer = 0; buffer < 2; ++buffer) {
      const uint64_t offset = (uint64_t{layer} * 2 + buffer) * table_capacity;
      set->layers_[layer].tables[buffer].device_slots = set->device_tables_ + offset;
      set->layers_[layer].tables[buffer].pinned_slots = set->pinned_tables_ + offset;
    }
  }
  return set;
}

ResidentSet::ResidentSet(DeviceBackend* backend, std::shared_ptr<SlotPool> pool,
                         SlotPool::HolderId holder, uint32_t num_layers, uint32_t table_capacity,
                         uint32_t layer_slot_cap)
    : backend_(backend),
      pool_(std::move(pool)),
      holder_(holder),
      table_capacity_(table_capacity),
      layer_slot_cap_(layer_slot_cap),
      layers_(num_layers) {}

ResidentSet::~ResidentSet() {
  // The slots go back to a pool other sequences keep using: wait until nothing reads or writes
  // them.
  std::vector<int32_t> held;
  for (LayerState& state : layers_) {
    for (TableBuffer& table : state.tables) {
      backend_->WaitEvent(table.release_event).IgnoreError();
      backend_->ReleaseEvent(table.release_event);
    }
    for (RetiredSlot& retired : state.retired) {
      backend_->WaitEvent(retired.event).IgnoreError();
      backend_->ReleaseEvent(retired.event);
      held.push_back(retired.slot);
    }
    for (AppendedBlock& appended : state.appended_unready) {
      backend_->WaitEvent(appended.event).IgnoreError();
      backend_->ReleaseEvent(appended.event);
    }
    if (state.pending.has_value()) {
      backend_->WaitEvent(state.pending->load_event).IgnoreError();
      backend_->ReleaseEvent(state.pending->load_event);
    }
    for (const auto& [block, slot] : state.resident) held.push_back(slot);
  }
  pool_->Give(holder_, held);
  pool_->Leave(holder_);
  if (device_tables_ != nullptr) backend_->FreeDevice(device_tables_);
  if (pinned_tables_ != nullptr) backend_->FreePinned(pinned_tables_);
}

void ResidentSet::NoteBlocks(uint32_t layer, uint32_t count) {
  assert(layer < layers_.size());
  layers_[layer].num_blocks = std::max(layers_[layer].num_blocks, count);
}

std::vector<uint32_t> ResidentSet::NotResident(uint32_t layer,
                                               const std::vector<uint32_t>& blocks) const {
  assert(layer < layers_.size());
  std::vector<uint32_t> missing;
  for (uint32_t block : blocks) {
    if (layers_[layer].resident.count(block) == 0) missing.push_back(block);
  }
  return missing;
}

std::vector<uint32_t> ResidentSet::Held(uint32_t layer) const {
  assert(layer < layers_.size());
  std::vector<uint32_t> held;
  for (const auto& [block, slot] : layers_[layer].resident) held.push_back(block);
  return held;
}

bool ResidentSet::ReadDone(const TableBuffer& table) {
  return !table.acquired && backend_->EventDone(table.release_event);
}

void ResidentSet::ReclaimRetired(uint32_t layer) {
  assert(layer < layers_.size());
  LayerState& state = layers_[layer];
  auto reusable = [&](const RetiredSlot& retired) {
    if (retired.table < 0) return backend_->EventDone(retired.event);
    const TableBuffer& table = state.tables[retired.table];
    return table.generation != retired.generation || ReadDone(table);
  };
  std::vector<RetiredSlot> still_read;
  std::vector<int32_t> done;
  for (RetiredSlot& retired : state.retired) {
    if (reusable(retired)) {
      backend_->ReleaseEvent(retired.event);
      done.push_back(retired.slot);
    } else {
      still_read.push_back(retired);
    }
  }
  state.retired = std::move(still_read);
  if (!done.empty()) pool_->Give(holder_, done);
}

absl::Status ResidentSet::TakeSlots(uint32_t layer, size_t count, std::vector<int32_t>* slots) {
  assert(layer < layers_.size());
  if (count == 0) return absl::OkStatus();
  ReclaimRetired(layer);
  // A pool of the sequence's own keeps each layer within slots_per_layer, so a table always fits
  // its capacity (in a shared pool a layer's resident blocks are distinct blocks below
  // max_blocks_per_layer, the capacity).
  const LayerState& state = layers_[layer];
  const size_t layer_held = state.resident.size() + state.retired.size();
  if (layer_slot_cap_ > 0 && layer_held + count > layer_slot_cap_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        count, " more slots needed in layer ", layer, ", which holds ", layer_held, " of its ",
        layer_slot_cap_, " slots_per_layer; the others are still read: raise slots_per_layer"));
  }
  return pool_->Take(holder_, count, slots);
}

uint32_t ResidentSet::AppendBlock(uint32_t layer, int32_t slot, EventHandle copied) {
  assert(layer < layers_.size());
  LayerState& state = layers_[layer];
  const uint32_t block = state.num_blocks++;
  state.resident[block] = slot;
  state.appended_unready.push_back({block, copied});
  return block;
}

EventHandle ResidentSet::pending_load_event(uint32_t layer) const {
  assert(layer < layers_.size());
  const LayerState& state = layers_[layer];
  return state.pending.has_value() ? state.pending->load_event : nullptr;
}

void ResidentSet::SetPending(uint32_t layer, PendingSelection pending,
                             const std::vector<int32_t>& slots) {
  assert(layer < layers_.size());
  assert(slots.size() == pending.new_blocks.size());
  LayerState& state = layers_[layer];
  if (state.pending.has_value()) {
    DropPending(state, std::set<uint32_t>(pending.blocks.begin(), pending.blocks.end()));
  }
  for (size_t i = 0; i < pending.new_blocks.size(); ++i) {
    state.resident[pending.new_blocks[i]] = slots[i];
  }
  state.pending = std::move(pending);
}

void ResidentSet::DropPending(LayerState& state, const std::set<uint32_t>& keep) {
  PendingSelection pending = std::move(*state.pending);
  state.pending.reset();
  // Replacing an unpublished selection is rare (its publication was deferred), and its copy was
  // issued a stride ago: waiting here is short.
  backend_->WaitEvent(pending.load_event).IgnoreError();
  backend_->ReleaseEvent(pending.load_event);
  const TableBuffer& visible = state.tables[state.visible];
  const std::set<uint32_t> shown(visible.blocks.begin(), visible.blocks.end());
  for (uint32_t block : pending.new_blocks) {
    if (keep.count(block) > 0 || shown.count(block) > 0) continue;
    auto resident = state.resident.find(block);
    if (resident == state.resident.end()) continue;
    pool_->Give(holder_, {resident->second});
    state.resident.erase(resident);
  }
}

bool ResidentSet::Publish(LayerState& state, const std::vector<uint32_t>& selection,
                          uint32_t known_blocks, uint64_t selection_step) {
  const int next = 1 - state.visible;
  if (!ReadDone(state.tables[next])) return false;
  std::set<uint32_t> blocks(selection.begin(), selection.end());
  for (uint32_t block : state.appended_ready) {
    if (block >= known_blocks) blocks.insert(block);
  }
  std::set<uint32_t> keep = blocks;
  for (const AppendedBlock& appended : state.appended_unready) keep.insert(appended.block);
  if (state.pending.has_value()) {
    keep.insert(state.pending->new_blocks.begin(), state.pending->new_blocks.end());
  }
  const TableBuffer& old = state.tables[state.visible];
  const std::set<uint32_t> old_blocks(old.blocks.begin(), old.blocks.end());
  for (auto it = state.resident.begin(); it != state.resident.end();) {
    if (keep.count(it->first) > 0) {
      ++it;
      continue;
    }
    if (old_blocks.count(it->first) > 0) {
      state.retired.push_back({it->second, state.visible, old.generation, nullptr});
    } else {
      pool_->Give(holder_, {it->second});  // never visible: no reader
    }
    state.appended_ready.erase(it->first);
    it = state.resident.erase(it);
  }
  TableBuffer& table = state.tables[next];
  table.blocks.clear();
  table.slots.clear();
  for (uint32_t block : blocks) {
    auto resident = state.resident.find(block);
    if (resident == state.resident.end()) continue;  // selected but never loaded: skip it
    // Resident blocks are distinct, fewer than the capacity (see TakeSlots): never write past it.
    assert(table.slots.size() < table_capacity_);
    if (table.slots.size() >= table_capacity_) break;
    table.pinned_slots[table.slots.size()] = resident->second;
    table.blocks.push_back(block);
    table.slots.push_back(resident->second);
  }
  table.generation = std::max(state.tables[0].generation, state.tables[1].generation) + 1;
  table.selection_step = selection_step;
  table.device_dirty = true;
  state.visible = next;
  state.visible_selection = selection;
  state.visible_known_blocks = known_blocks;
  return true;
}

std::optional<uint64_t> ResidentSet::PublishReady(uint32_t layer) {
  assert(layer < layers_.size());
  LayerState& state = layers_[layer];
  std::vector<AppendedBlock> unready;
  for (AppendedBlock& appended : state.appended_unready) {
    if (backend_->EventDone(appended.event)) {
      backend_->ReleaseEvent(appended.event);
      state.appended_ready.insert(appended.block);
    } else {
      unready.push_back(appended);
    }
  }
  state.appended_unready = std::move(unready);
  if (state.pending.has_value() && backend_->EventDone(state.pending->load_event)) {
    PendingSelection pending = std::move(*state.pending);
    state.pending.reset();
    if (Publish(state, pending.blocks, pending.known_blocks, pending.selection_step)) {
      backend_->ReleaseEvent(pending.load_event);
      return pending.selection_step;
    }
    state.pending = std::move(pending);  // the other table is still read: next boundary
    return std::nullopt;
  }
  const TableBuffer& visible = state.tables[state.visible];
  const std::set<uint32_t> shown(visible.blocks.begin(), visible.blocks.end());
  for (uint32_t block : state.appended_ready) {
    if (block >= state.visible_known_blocks && shown.count(block) == 0) {
      Publish(state, state.visible_selection, state.visible_known_blocks, visible.selection_step);
      break;
    }
  }
  return std::nullopt;
}

absl::StatusOr<SlotTable> ResidentSet::Acquire(uint32_t layer, StreamHandle stream) {
  assert(layer < layers_.size());
  LayerState& state = layers_[layer];
  if (state.acquired_table >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " acquired twice without Release"));
  }
  TableBuffer& table = state.tables[state.visible];
  if (table.device_dirty) {
    absl::Status status =
        backend_->Copy(table.device_slots, MemoryKind::kDevice, table.pinned_slots,
                       MemoryKind::kHost, table.slots.size() * sizeof(int32_t), stream);
    if (!status.ok()) return status;
    table.device_dirty = false;
  }
  table.acquired = true;
  state.acquired_table = state.visible;
  SlotTable result;
  result.layer = layer;
  result.count = static_cast<uint32_t>(table.blocks.size());
  result.device_slots = table.device_slots;
  result.host_slots = table.slots.data();
  result.block_indices = table.blocks.data();
  result.slot_pool = pool_->base();
  result.slot_bytes = pool_->slot_bytes();
  result.slots_per_layer = 0;
  result.selection_step = table.selection_step;
  return result;
}

absl::Status ResidentSet::Release(uint32_t layer, StreamHandle stream) {
  assert(layer < layers_.size());
  LayerState& state = layers_[layer];
  if (state.acquired_table < 0) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " released, not acquired"));
  }
  absl::StatusOr<EventHandle> read = backend_->RecordEvent(stream);
  if (!read.ok()) return read.status();
  TableBuffer& table = state.tables[state.acquired_table];
  backend_->ReleaseEvent(table.release_event);
  table.release_event = *read;
  table.acquired = false;
  state.acquired_table = -1;
  return absl::OkStatus();
}

}  // namespace kvstar::client_internal
