// SequenceImpl: one sequence's slots, double-buffered slot tables, query ring and step logic.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/client_impl.h"

namespace kvstar::client_internal {
namespace {

absl::Status ValidateProfile(const ModelProfile& profile) {
  if (profile.num_layers == 0 || profile.num_q_heads == 0 || profile.num_kv_heads == 0 ||
      profile.head_dim == 0 || profile.block_size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile: num_layers ", profile.num_layers, ", num_q_heads ",
                     profile.num_q_heads, ", num_kv_heads ", profile.num_kv_heads, ", head_dim ",
                     profile.head_dim, ", block_size ", profile.block_size, ": all must be > 0"));
  }
  if (DTypeBytes(profile.dtype) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.dtype ", static_cast<uint32_t>(profile.dtype), " is unknown"));
  }
  if (profile.num_q_heads % profile.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("profile.num_q_heads ", profile.num_q_heads,
                                                   " is not a multiple of num_kv_heads ",
                                                   profile.num_kv_heads));
  }
  return absl::OkStatus();
}

}  // namespace

SequenceImpl::SequenceImpl(ClientImpl* client, std::string id, ModelProfile profile,
                           KvstarConfig config)
    : client_(client),
      backend_(client->device()),
      id_(std::move(id)),
      profile_(profile),
      config_(config),
      key_bytes_(profile.block_key_bytes()),
      slot_bytes_(2 * profile.block_key_bytes()) {}

SequenceImpl::~SequenceImpl() {
  absl::MutexLock lock(&mu_);
  // Slots go back to a pool other sequences keep using: wait until nothing reads or writes them.
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
      if (state.pending->staging != nullptr) client_->staging()->Release(state.pending->staging);
    }
    for (const auto& [block, slot] : state.resident) held.push_back(slot);
  }
  if (joined_) {
    pool_->Give(holder_, held);
    pool_->Leave(holder_);
  }
  for (EventHandle& event : query_events_) backend_->ReleaseEvent(event);
  backend_->WaitEvent(segment_reads_).IgnoreError();
  backend_->ReleaseEvent(segment_reads_);
  if (load_stream_ != nullptr) backend_->DestroyStream(load_stream_);
  if (device_tables_ != nullptr) backend_->FreeDevice(device_tables_);
  if (pinned_tables_ != nullptr) backend_->FreePinned(pinned_tables_);
  if (query_ring_ != nullptr) backend_->FreePinned(query_ring_);
}

absl::Status SequenceImpl::Init(const SequenceOptions& options,
                                std::shared_ptr<SlotPool> shared_pool) {
  if (absl::Status status = ValidateProfile(profile_); !status.ok()) return status;
  if (config_.retrieval_stride == 0) {
    return absl::InvalidArgumentError("config.retrieval_stride must be > 0");
  }
  uint64_t reserved = 0;
  if (shared_pool != nullptr) {
    if (options.slots_per_layer != 0 || options.slot_pool != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("options.slots_per_layer ", options.slots_per_layer, " / options.slot_pool ",
                       options.slot_pool == nullptr ? "null" : "set",
                       ": the client has a shared slot pool; a sequence cannot have its own"));
    }
    if (options.max_blocks_per_layer == 0) {
      return absl::InvalidArgumentError(
          "options.max_blocks_per_layer must be > 0 with a shared slot pool (it sizes the "
          "sequence's reservation)");
    }
    if (shared_pool->slot_bytes() != slot_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "profile: a block of sequence ", id_, " is ", slot_bytes_,
          " bytes (K + V), the shared slot pool's slots are ", shared_pool->slot_bytes()));
    }
    pool_ = std::move(shared_pool);
    shared_pool_ = true;
    max_blocks_per_layer_ = options.max_blocks_per_layer;
    table_capacity_ = options.max_blocks_per_layer;
    reserved = ReservedSlots(profile_, config_, options.max_blocks_per_layer);
  } else {
    uint32_t slots_per_layer = options.slots_per_layer;
    if (slots_per_layer == 0) {
      if (options.max_blocks_per_layer == 0) {
        return absl::InvalidArgumentError(
            "options: set slots_per_layer or max_blocks_per_layer (both are 0)");
      }
      slots_per_layer =
          2 * static_cast<uint32_t>(ReservedSlots(profile_, config_, options.max_blocks_per_layer) /
                                    profile_.num_layers) +
          2;
    }
    SlotPoolOptions own;
    own.slot_bytes = slot_bytes_;
    own.num_slots = uint64_t{profile_.num_layers} * slots_per_layer;
    own.memory = options.slot_pool;
    own.memory_bytes = options.slot_pool_bytes;
    absl::StatusOr<std::shared_ptr<SlotPool>> pool = SlotPool::Create(backend_, own);
    if (!pool.ok()) {
      return absl::Status(pool.status().code(),
                          absl::StrCat("options (", slots_per_layer,
                                       " slots per layer): ", pool.status().message()));
    }
    pool_ = *std::move(pool);
    table_capacity_ = slots_per_layer;
    reserved = own.num_slots;
  }
  absl::StatusOr<SlotPool::HolderId> holder = pool_->Join(id_, reserved);
  if (!holder.ok()) return holder.status();
  holder_ = *holder;
  joined_ = true;
  const uint64_t table_entries = uint64_t{2} * profile_.num_layers * table_capacity_;
  absl::StatusOr<void*> device_tables = backend_->AllocDevice(table_entries * sizeof(int32_t));
  if (!device_tables.ok()) return device_tables.status();
  device_tables_ = static_cast<int32_t*>(*device_tables);
  absl::StatusOr<void*> pinned_tables = backend_->AllocPinned(table_entries * sizeof(int32_t));
  if (!pinned_tables.ok()) return pinned_tables.status();
  pinned_tables_ = static_cast<int32_t*>(*pinned_tables);
  const uint64_t ring_bytes =
      uint64_t{2} * config_.retrieval_stride * profile_.num_layers * profile_.query_bytes();
  absl::StatusOr<void*> ring = backend_->AllocPinned(ring_bytes);
  if (!ring.ok()) return ring.status();
  query_ring_ = static_cast<char*>(*ring);
  std::memset(query_ring_, 0, ring_bytes);
  absl::StatusOr<StreamHandle> stream = backend_->CreateStream();
  if (!stream.ok()) return stream.status();
  load_stream_ = *stream;

  absl::MutexLock lock(&mu_);
  layers_.resize(profile_.num_layers);
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    LayerState& state = layers_[layer];
    for (int buffer = 0; buffer < 2; ++buffer) {
      const uint64_t offset = (uint64_t{layer} * 2 + buffer) * table_capacity_;
      state.tables[buffer].device_slots = device_tables_ + offset;
      state.tables[buffer].pinned_slots = pinned_tables_ + offset;
    }
  }
  return absl::OkStatus();
}

absl::Status SequenceImpl::CheckLayer(uint32_t layer) const {
  if (layer >= profile_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range: sequence ", id_,
                                                   " has ", profile_.num_layers, " layers"));
  }
  return absl::OkStatus();
}

char* SequenceImpl::QueryAddress(uint64_t step, uint32_t layer) const {
  const uint64_t stride = config_.retrieval_stride;
  const uint64_t window = (step / stride) % 2;
  const uint64_t row = (window * stride + step % stride) * profile_.num_layers + layer;
  return query_ring_ + row * profile_.query_bytes();
}

void SequenceImpl::SetError(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  if (error_.ok()) error_ = status;
}

absl::Status SequenceImpl::TakeError() {
  absl::MutexLock lock(&mu_);
  absl::Status status = std::move(error_);
  error_ = absl::OkStatus();
  if (!status.ok() && stats_.unacknowledged_blocks > 0) {
    status = absl::Status(
        status.code(),
        absl::StrCat(status.message(), " (", stats_.unacknowledged_blocks, " blocks of sequence ",
                     id_, " not acknowledged: offload them again)"));
    stats_.unacknowledged_blocks = 0;
  }
  return status;
}

void SequenceImpl::OffloadDone(uint64_t blocks, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  if (status.ok()) {
    stats_.blocks_offloaded += blocks;
    return;
  }
  stats_.unacknowledged_blocks += blocks;
  if (error_.ok()) error_ = status;
}

absl::Status SequenceImpl::StageAndQueue(uint32_t layer, uint32_t block_index, const void* key,
                                         const void* value, MemoryKind where, void* stream) {
  absl::StatusOr<void*> staging = client_->staging()->Acquire(slot_bytes_);
  if (!staging.ok()) return staging.status();
  char* bytes = static_cast<char*>(*staging);
  OffloadItem item{this, layer, block_index, bytes, key_bytes_, nullptr};
  absl::Status status;
  if (where == MemoryKind::kHost) {
    std::memcpy(bytes, key, key_bytes_);
    std::memcpy(bytes + key_bytes_, value, key_bytes_);
  } else {
    // On the side stream, after the engine's work that produced the block.
    StreamHandle side = client_->query_stream();
    absl::StatusOr<EventHandle> produced = backend_->RecordEvent(stream);
    status = produced.status();
    if (status.ok()) status = backend_->StreamWaitEvent(side, *produced);
    if (produced.ok()) backend_->ReleaseEvent(*produced);
    if (status.ok())
      status = backend_->Copy(bytes, MemoryKind::kHost, key, where, key_bytes_, side);
    if (status.ok()) {
      status =
          backend_->Copy(bytes + key_bytes_, MemoryKind::kHost, value, where, key_bytes_, side);
    }
    absl::StatusOr<EventHandle> copied =
        status.ok() ? backend_->RecordEvent(side) : absl::StatusOr<EventHandle>(status);
    if (copied.ok()) item.ready = *copied;
    status = copied.status();
  }
  if (!status.ok()) {
    client_->staging()->Release(bytes);
    return status;
  }
  client_->EnqueueOffload(item);
  return absl::OkStatus();
}

absl::Status SequenceImpl::Offload(uint32_t layer, uint32_t block_index, const void* key,
                                   const void* value, MemoryKind where, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  {
    absl::MutexLock lock(&mu_);
    // An earlier background error is reported here too, but only Flush clears it.
    if (!error_.ok()) return error_;
    layers_[layer].num_blocks = std::max(layers_[layer].num_blocks, block_index + 1);
  }
  return StageAndQueue(layer, block_index, key, value, where, stream);
}

absl::Status SequenceImpl::AppendBlock(uint32_t layer, const void* key, const void* value,
                                       MemoryKind where, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  uint32_t block_index = 0;
  std::vector<int32_t> slots;
  {
    absl::MutexLock lock(&mu_);
    if (!sealed_) return absl::FailedPreconditionError("AppendBlock before Seal");
    if (!error_.ok()) return error_;
    LayerState& state = layers_[layer];
    if (max_blocks_per_layer_ != 0 && state.num_blocks >= max_blocks_per_layer_) {
      return absl::OutOfRangeError(absl::StrCat("AppendBlock: layer ", layer, " of sequence ", id_,
                                                " already has max_blocks_per_layer (",
                                                max_blocks_per_layer_, ") blocks"));
    }
    if (absl::Status status = TakeSlots(state, 1, &slots); !status.ok()) {
      return absl::Status(status.code(),
                          absl::StrCat("decode block of layer ", layer, ": ", status.message()));
    }
    block_index = state.num_blocks++;
  }
  char* slot = SlotAddress(slots[0]);
  absl::Status status = backend_->Copy(slot, MemoryKind::kDevice, key, where, key_bytes_, stream);
  if (status.ok()) {
    status =
        backend_->Copy(slot + key_bytes_, MemoryKind::kDevice, value, where, key_bytes_, stream);
  }
  absl::StatusOr<EventHandle> copied =
      status.ok() ? backend_->RecordEvent(stream) : absl::StatusOr<EventHandle>(status);
  {
    absl::MutexLock lock(&mu_);
    LayerState& state = layers_[layer];
    if (!copied.ok()) {
      GiveSlot(slots[0]);
      return copied.status();
    }
    state.resident[block_index] = slots[0];
    state.appended_unready.push_back({block_index, *copied});
  }
  return StageAndQueue(layer, block_index, key, value, where, stream);
}

absl::Status SequenceImpl::Flush() {
  client_->WaitOffloadsIdle();
  return TakeError();
}

bool SequenceImpl::sealed() const {
  absl::MutexLock lock(&mu_);
  return sealed_;
}

absl::Status SequenceImpl::Seal(const void* queries, uint32_t num_queries, MemoryKind where,
                                void* stream) {
  if (absl::Status status = Flush(); !status.ok()) return status;
  const uint64_t layer_bytes = uint64_t{num_queries} * profile_.query_bytes();
  v1::SealRequest request;
  request.set_sequence_id(id_);
  std::string host(layer_bytes * profile_.num_layers, '\0');
  if (!host.empty()) {
    // Prefill, not the decode path: a plain ordered copy and a wait.
    absl::Status status =
        backend_->Copy(host.data(), MemoryKind::kHost, queries, where, host.size(), stream);
    absl::StatusOr<EventHandle> done =
        status.ok() ? backend_->RecordEvent(stream) : absl::StatusOr<EventHandle>(status);
    if (!done.ok()) return done.status();
    status = backend_->WaitEvent(*done);
    backend_->ReleaseEvent(*done);
    if (!status.ok()) return status;
  }
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    v1::LayerQueries* layer_queries = request.add_queries();
    layer_queries->set_layer(layer);
    layer_queries->set_num_queries(num_queries);
    layer_queries->set_queries(host.substr(layer * layer_bytes, layer_bytes));
  }
  absl::StatusOr<v1::SealResponse> response = client_->SealRpc(request);
  if (!response.ok()) return response.status();
  if (absl::Status status = LoadSealSelections(*response, 0); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    LayerState& state = layers_[layer];
    state.num_blocks = std::max(state.num_blocks, response->num_blocks());
    if (state.pending.has_value()) {
      if (absl::Status status = backend_->WaitEvent(state.pending->load_event); !status.ok()) {
        return status;
      }
    }
    PublishReadyLocked(layer);
    if (state.pending.has_value()) {
      return absl::InternalError(
          absl::StrCat("first selection of layer ", layer, " could not be published"));
    }
  }
  sealed_ = true;
  decode_step_ = 0;
  return absl::OkStatus();
}

absl::Status SequenceImpl::LoadSealSelections(const v1::SealResponse& response,
                                              uint64_t selection_step) {
  std::vector<bool> selected(profile_.num_layers, false);
  for (const v1::LayerSelection& selection : response.selections()) {
    if (absl::Status status = CheckLayer(selection.layer()); !status.ok()) {
      return absl::InternalError(absl::StrCat("Seal reply: ", status.message()));
    }
    selected[selection.layer()] = true;
    std::vector<uint32_t> blocks(selection.block_indices().begin(),
                                 selection.block_indices().end());
    absl::Status status = LoadSelection(selection.layer(), std::move(blocks), response.num_blocks(),
                                        selection_step, {}, nullptr);
    if (!status.ok()) return status;
  }
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    if (!selected[layer]) {
      return absl::InternalError(absl::StrCat("Seal reply has no selection for layer ", layer));
    }
  }
  return absl::OkStatus();
}

absl::Status SequenceImpl::Reseal() {
  if (absl::Status status = Flush(); !status.ok()) return status;
  uint64_t end_step = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!sealed_) return absl::FailedPreconditionError("Reseal before Seal");
    end_step = decode_step_ / config_.retrieval_stride * config_.retrieval_stride;
  }
  if (end_step == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Reseal needs retrieval_stride (", config_.retrieval_stride, ") recorded decode steps"));
  }
  v1::SealRequest request;
  request.set_sequence_id(id_);
  if (absl::Status status = CollectWindow(end_step, request.mutable_queries()); !status.ok()) {
    return status;
  }
  absl::StatusOr<v1::SealResponse> response = client_->SealRpc(request);
  if (!response.ok()) return response.status();
  return LoadSealSelections(*response, end_step);
}

absl::Status SequenceImpl::CollectWindow(
    uint64_t end_step, google::protobuf::RepeatedPtrField<v1::LayerQueries>* queries) {
  const uint64_t stride = config_.retrieval_stride;
  EventHandle copied = nullptr;
  {
    absl::MutexLock lock(&mu_);
    std::swap(copied, query_events_[((end_step - 1) / stride) % 2]);
  }
  absl::Status status = backend_->WaitEvent(copied);
  backend_->ReleaseEvent(copied);
  if (!status.ok()) return status;
  const uint64_t query_bytes = profile_.query_bytes();
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    v1::LayerQueries* layer_queries = queries->Add();
    layer_queries->set_layer(layer);
    layer_queries->set_num_queries(static_cast<uint32_t>(stride));
    std::string* bytes = layer_queries->mutable_queries();
    bytes->reserve(stride * query_bytes);
    for (uint64_t past = stride; past > 0; --past) {  // oldest first
      bytes->append(QueryAddress(end_step - past, layer), query_bytes);
    }
  }
  return absl::OkStatus();
}

absl::Status SequenceImpl::RecordQuery(uint32_t layer, const void* query, MemoryKind where,
                                       void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
  if (!sealed_) return absl::FailedPreconditionError("RecordQuery before Seal");
  char* destination = QueryAddress(decode_step_, layer);
  if (where == MemoryKind::kHost) {
    std::memcpy(destination, query, profile_.query_bytes());
    return absl::OkStatus();
  }
  StreamHandle side = client_->query_stream();
  absl::StatusOr<EventHandle> produced = backend_->RecordEvent(stream);
  if (!produced.ok()) return produced.status();
  absl::Status status = backend_->StreamWaitEvent(side, *produced);
  backend_->ReleaseEvent(*produced);
  if (status.ok()) {
    status =
        backend_->Copy(destination, MemoryKind::kHost, query, where, profile_.query_bytes(), side);
  }
  if (!status.ok()) return status;
  absl::StatusOr<EventHandle> copied = backend_->RecordEvent(side);
  if (!copied.ok()) return copied.status();
  // The side stream is in order: the latest event of a window covers all its earlier copies.
  EventHandle& window_event = query_events_[(decode_step_ / config_.retrieval_stride) % 2];
  backend_->ReleaseEvent(window_event);
  window_event = *copied;
  return absl::OkStatus();
}

absl::StatusOr<SlotTable> SequenceImpl::Acquire(uint32_t layer, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
  if (!sealed_) return absl::FailedPreconditionError("Acquire before Seal");
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
  result.step = decode_step_;
  result.count = static_cast<uint32_t>(table.blocks.size());
  result.device_slots = table.device_slots;
  result.host_slots = table.slots.data();
  result.block_indices = table.blocks.data();
  result.slot_pool = pool_->base();
  result.slot_bytes = slot_bytes_;
  result.slots_per_layer = 0;
  result.selection_step = table.selection_step;
  return result;
}

absl::Status SequenceImpl::Release(uint32_t layer, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
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

SequenceStats SequenceImpl::stats() const {
  absl::MutexLock lock(&mu_);
  SequenceStats stats = stats_;
  stats.decode_step = decode_step_;
  const SlotPool::HolderStats held = pool_->holder_stats(holder_);
  stats.reserved_slots = held.reserved_slots;
  stats.slots_held = held.slots_held;
  stats.peak_slots_held = held.peak_slots_held;
  return stats;
}

bool SequenceImpl::ReadDone(const TableBuffer& table) {
  return !table.acquired && backend_->EventDone(table.release_event);
}

void SequenceImpl::ReclaimRetiredLocked(LayerState& state) {
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

absl::Status SequenceImpl::TakeSlots(LayerState& state, size_t count, std::vector<int32_t>* slots) {
  if (count == 0) return absl::OkStatus();
  ReclaimRetiredLocked(state);
  // An own pool keeps each layer within slots_per_layer, so a table always fits its capacity (in
  // a shared pool a layer's resident blocks are distinct blocks below max_blocks_per_layer).
  const size_t layer_held = state.resident.size() + state.retired.size();
  if (!shared_pool_ && layer_held + count > table_capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("sequence ", id_, " needs ", count, " more slots in a layer holding ",
                     layer_held, " of its ", table_capacity_,
                     " slots_per_layer; the others are still read: raise slots_per_layer"));
  }
  return pool_->Take(holder_, count, slots);
}

bool SequenceImpl::PublishLocked(LayerState& state, const std::vector<uint32_t>& selection,
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
      GiveSlot(it->second);  // never visible: no reader
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
    // LoadSelection and AppendBlock keep a table within its capacity; never write past it.
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

void SequenceImpl::PublishReadyLocked(uint32_t layer) {
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
    if (PublishLocked(state, pending.blocks, pending.known_blocks, pending.selection_step)) {
      backend_->ReleaseEvent(pending.load_event);
      if (pending.staging != nullptr) client_->staging()->Release(pending.staging);
      ++stats_.selections_published;
      stats_.last_staleness_steps = decode_step_ - std::min(decode_step_, pending.selection_step);
      stats_.max_staleness_steps =
          std::max(stats_.max_staleness_steps, stats_.last_staleness_steps);
      return;
    }
    state.pending = std::move(pending);  // the other table is still read: next boundary
    return;
  }
  const TableBuffer& visible = state.tables[state.visible];
  const std::set<uint32_t> shown(visible.blocks.begin(), visible.blocks.end());
  for (uint32_t block : state.appended_ready) {
    if (block >= state.visible_known_blocks && shown.count(block) == 0) {
      PublishLocked(state, state.visible_selection, state.visible_known_blocks,
                    visible.selection_step);
      return;
    }
  }
}

bool SequenceImpl::AdvanceStep() {
  absl::MutexLock lock(&mu_);
  if (!sealed_) return false;
  ++decode_step_;
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    PublishReadyLocked(layer);
    // Slots nothing reads any more go back now, for any sequence of the pool to use.
    ReclaimRetiredLocked(layers_[layer]);
  }
  if (decode_step_ % config_.retrieval_stride != 0) return false;
  due_step_ = decode_step_;
  return true;
}

absl::Status SequenceImpl::BuildRetrieval(v1::SequenceQueries* request,
                                          std::vector<uint32_t>* known_blocks) {
  // The window that was complete when the retrieval became due, even if the engine has stepped
  // on since: its ring half is not overwritten before the next due step, which waits for us.
  uint64_t step = 0;
  {
    absl::MutexLock lock(&mu_);
    step = due_step_;
  }
  if (absl::Status status = CollectWindow(step, request->mutable_queries()); !status.ok()) {
    return status;
  }
  request->set_sequence_id(id_);
  request->set_decode_step(step);
  request->set_include_data(true);
  absl::MutexLock lock(&mu_);
  known_blocks->assign(profile_.num_layers, 0);
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    const LayerState& state = layers_[layer];
    v1::HeldBlocks* held = request->add_held();
    held->set_layer(layer);
    for (const auto& [block, slot] : state.resident) held->add_block_indices(block);
    (*known_blocks)[layer] = state.num_blocks;
  }
  return absl::OkStatus();
}

absl::Status SequenceImpl::WaitSegmentReads() {
  EventHandle reads = nullptr;
  {
    absl::MutexLock lock(&mu_);
    std::swap(reads, segment_reads_);
  }
  // Loads are issued a stride before the next Retrieve: normally long complete.
  absl::Status status = backend_->WaitEvent(reads);
  backend_->ReleaseEvent(reads);
  return status;
}

void SequenceImpl::DropPendingLocked(LayerState& state, const std::set<uint32_t>& keep) {
  PendingSelection pending = std::move(*state.pending);
  state.pending.reset();
  // Replacing an unpublished selection is rare (its publication was deferred), and its copy was
  // issued a stride ago: waiting here is short.
  backend_->WaitEvent(pending.load_event).IgnoreError();
  backend_->ReleaseEvent(pending.load_event);
  if (pending.staging != nullptr) client_->staging()->Release(pending.staging);
  const TableBuffer& visible = state.tables[state.visible];
  const std::set<uint32_t> shown(visible.blocks.begin(), visible.blocks.end());
  for (uint32_t block : pending.new_blocks) {
    if (keep.count(block) > 0 || shown.count(block) > 0) continue;
    auto resident = state.resident.find(block);
    if (resident == state.resident.end()) continue;
    GiveSlot(resident->second);
    state.resident.erase(resident);
  }
}

absl::Status SequenceImpl::LoadSelection(uint32_t layer, std::vector<uint32_t> blocks,
                                         uint32_t known_blocks, uint64_t selection_step,
                                         std::vector<v1::Block> data,
                                         std::shared_ptr<const SharedSegment> segment) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  std::vector<uint32_t> needed;
  {
    absl::MutexLock lock(&mu_);
    const LayerState& state = layers_[layer];
    for (uint32_t block : blocks) {
      if (state.resident.count(block) == 0) needed.push_back(block);
    }
  }
  // Bytes of each needed block: from the reply (in it or in the segment), else fetched.
  std::map<uint32_t, const v1::Block*> by_index;
  for (const v1::Block& block : data) {
    if (block.layer() != layer) continue;
    // A region of a segment this client has not mapped (the server restarted): fetch it.
    if (block.has_shared() && (segment == nullptr || block.shared().segment() != segment->name())) {
      continue;
    }
    by_index[block.block_index()] = &block;
  }
  std::vector<uint32_t> missing;
  for (uint32_t block : needed) {
    if (by_index.count(block) == 0) missing.push_back(block);
  }
  std::vector<v1::Block> fetched;
  if (!missing.empty()) {
    absl::Status status = client_->GetBlocksRpc(id_, layer, missing, &fetched);
    if (!status.ok()) return status;
    for (const v1::Block& block : fetched) {
      if (block.layer() == layer) by_index[block.block_index()] = &block;
    }
  }
  for (uint32_t block : needed) {
    auto found = by_index.find(block);
    if (found == by_index.end()) {
      return absl::DataLossError(absl::StrCat("block ", block, " of layer ", layer,
                                              " was selected but its bytes never came"));
    }
    const v1::Block& bytes = *found->second;
    if (bytes.has_shared()) {
      const v1::SharedMemoryRef& region = bytes.shared();
      if (region.length() != key_bytes_ ||
          segment->Region(region.offset(), key_bytes_) == nullptr) {
        return absl::DataLossError(absl::StrCat(
            "block ", block, " of layer ", layer, ": shared region at offset ", region.offset(),
            " of ", region.length(), " bytes per K/V (expected ", key_bytes_,
            ") does not fit segment ", segment->name(), " of ", segment->size(), " bytes"));
      }
    } else if (bytes.key().size() != key_bytes_ || bytes.value().size() != key_bytes_) {
      return absl::DataLossError(absl::StrCat("block ", block, " of layer ", layer, ": K/V of ",
                                              bytes.key().size(), "/", bytes.value().size(),
                                              " bytes, expected ", key_bytes_));
    }
  }
  if (blocks.size() > table_capacity_) {
    absl::MutexLock lock(&mu_);
    ++stats_.selections_dropped;
    return absl::ResourceExhaustedError(
        absl::StrCat("selection of layer ", layer, " of sequence ", id_, " has ", blocks.size(),
                     " blocks, more than a table holds (", table_capacity_,
                     shared_pool_ ? ": max_blocks_per_layer)" : ": slots_per_layer)"));
  }
  std::vector<int32_t> slots;
  {
    absl::MutexLock lock(&mu_);
    LayerState& state = layers_[layer];
    if (absl::Status status = TakeSlots(state, needed.size(), &slots); !status.ok()) {
      ++stats_.selections_dropped;
      return absl::Status(
          status.code(),
          absl::StrCat("selection of layer ", layer, " (", needed.size(),
                       " new blocks) dropped, the visible table stays: ", status.message()));
    }
  }
  // Blocks in the segment are copied from it as they lie (K then V, like a slot); blocks that
  // came as bytes are staged in pinned memory first.
  size_t shared_count = 0;
  for (uint32_t block : needed) shared_count += by_index[block]->has_shared() ? 1 : 0;
  const size_t staged_count = needed.size() - shared_count;
  void* staging = nullptr;
  EventHandle loaded = nullptr;
  EventHandle segment_read = nullptr;
  absl::Status status;
  if (staged_count > 0) {
    absl::StatusOr<void*> buffer = client_->staging()->Acquire(staged_count * slot_bytes_);
    status = buffer.status();
    if (status.ok()) staging = *buffer;
  }
  if (status.ok() && !needed.empty()) {
    std::vector<CopySegment> segments;
    char* staged = static_cast<char*>(staging);
    for (size_t i = 0; i < needed.size(); ++i) {
      const v1::Block& block = *by_index[needed[i]];
      if (block.has_shared()) {
        segments.push_back({SlotAddress(slots[i]),
                            segment->Region(block.shared().offset(), key_bytes_), slot_bytes_});
        continue;
      }
      std::memcpy(staged, block.key().data(), key_bytes_);
      std::memcpy(staged + key_bytes_, block.value().data(), key_bytes_);
      segments.push_back({SlotAddress(slots[i]), staged, slot_bytes_});
      staged += slot_bytes_;
    }
    status = backend_->CopyToDeviceBatch(segments.data(), segments.size(), load_stream_);
    if (status.ok()) {
      absl::StatusOr<EventHandle> event = backend_->RecordEvent(load_stream_);
      status = event.status();
      if (event.ok()) loaded = *event;
    }
    if (status.ok() && shared_count > 0) {
      absl::StatusOr<EventHandle> event = backend_->RecordEvent(load_stream_);
      status = event.status();
      if (event.ok()) segment_read = *event;
    }
  }
  absl::MutexLock lock(&mu_);
  LayerState& state = layers_[layer];
  if (!status.ok()) {
    // A failed copy may have been partly issued: wait for the stream before reusing the slots
    // (or letting the server reuse the regions).
    EventHandle issued = backend_->RecordEvent(load_stream_).value_or(nullptr);
    backend_->WaitEvent(issued).IgnoreError();
    backend_->ReleaseEvent(issued);
    backend_->ReleaseEvent(loaded);
    pool_->Give(holder_, slots);
    if (staging != nullptr) client_->staging()->Release(staging);
    ++stats_.selections_dropped;
    return status;
  }
  if (state.pending.has_value()) {
    DropPendingLocked(state, std::set<uint32_t>(blocks.begin(), blocks.end()));
  }
  for (size_t i = 0; i < needed.size(); ++i) state.resident[needed[i]] = slots[i];
  stats_.blocks_loaded += needed.size();
  stats_.bytes_loaded += needed.size() * slot_bytes_;
  stats_.blocks_already_resident += blocks.size() - needed.size();
  PendingSelection pending;
  pending.blocks = std::move(blocks);
  pending.known_blocks = known_blocks;
  pending.selection_step = selection_step;
  pending.new_blocks = std::move(needed);
  pending.load_event = loaded;
  pending.staging = staging;
  if (shared_count > 0) pending.segment = std::move(segment);
  state.pending = std::move(pending);
  if (segment_read != nullptr) {
    // The stream is in order: the latest event covers every earlier copy from the segment.
    backend_->ReleaseEvent(segment_reads_);
    segment_reads_ = segment_read;
  }
  return absl::OkStatus();
}

}  // namespace kvstar::client_internal
