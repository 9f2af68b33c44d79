// SequenceImpl: one sequence's offloads, seal, query ring and step logic; its slots and tables are
// its ResidentSet (resident_set.h), the bytes of its loads come through a BlockDataPlane.
#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <map>
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
  {
    absl::MutexLock lock(&mu_);
    resident_.reset();  // waits for the reads and copies of its slots, gives them back
    for (EventHandle& event : query_events_) backend_->ReleaseEvent(event);
  }
  backend_->WaitEvent(segment_reads_).IgnoreError();
  backend_->ReleaseEvent(segment_reads_);
  if (load_stream_ != nullptr) backend_->DestroyStream(load_stream_);
  if (query_ring_ != nullptr) backend_->FreePinned(query_ring_);
}

absl::Status SequenceImpl::Init(const SequenceOptions& options,
                                std::shared_ptr<SlotPool> shared_pool) {
  if (absl::Status status = ValidateProfile(profile_); !status.ok()) return status;
  if (config_.retrieval_stride == 0) {
    return absl::InvalidArgumentError("config.retrieval_stride must be > 0");
  }
  uint64_t reserved = 0;
  uint32_t table_capacity = 0;
  uint32_t layer_slot_cap = 0;
  std::shared_ptr<SlotPool> pool;
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
    pool = std::move(shared_pool);
    max_blocks_per_layer_ = options.max_blocks_per_layer;
    table_capacity = options.max_blocks_per_layer;
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
    absl::StatusOr<std::shared_ptr<SlotPool>> own_pool = SlotPool::Create(backend_, own);
    if (!own_pool.ok()) {
      return absl::Status(own_pool.status().code(),
                          absl::StrCat("options (", slots_per_layer,
                                       " slots per layer): ", own_pool.status().message()));
    }
    pool = *std::move(own_pool);
    table_capacity = slots_per_layer;
    layer_slot_cap = slots_per_layer;
    reserved = own.num_slots;
  }
  pool_ = pool;
  resident_capacity_ = table_capacity;
  absl::StatusOr<std::unique_ptr<ResidentSet>> resident =
      ResidentSet::Create(backend_, std::move(pool), id_, reserved, profile_.num_layers,
                          table_capacity, layer_slot_cap);
  if (!resident.ok()) return resident.status();
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
  resident_ = *std::move(resident);
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
  const uint64_t clock = Clock(step);
  const uint64_t window = (clock / stride) % 2;
  const uint64_t row = (window * stride + clock % stride) * profile_.num_layers + layer;
  return query_ring_ + row * profile_.query_bytes();
}

uint64_t SequenceImpl::LastDueStep(uint64_t step) const {
  const uint64_t stride = config_.retrieval_stride;
  const uint64_t clock = Clock(step) / stride * stride;
  // Due steps are clock multiples of the stride with a whole window recorded since the Seal.
  if (clock < phase_ + stride) return 0;
  return clock - phase_;
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
  if (max_blocks_per_layer_ != 0 && block_index >= max_blocks_per_layer_) {
    return absl::OutOfRangeError(absl::StrCat("Offload: block_index ", block_index, " of sequence ",
                                              id_, " is past max_blocks_per_layer (",
                                              max_blocks_per_layer_, ")"));
  }
  {
    absl::MutexLock lock(&mu_);
    // An earlier background error is reported here too, but only Flush clears it.
    if (!error_.ok()) return error_;
    resident_->NoteBlocks(layer, block_index + 1);
  }
  return StageAndQueue(layer, block_index, key, value, where, stream);
}

absl::Status SequenceImpl::AppendBlock(uint32_t layer, const void* key, const void* value,
                                       MemoryKind where, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  std::vector<int32_t> slots;
  {
    absl::MutexLock lock(&mu_);
    if (!sealed_) return absl::FailedPreconditionError("AppendBlock before Seal");
    if (!error_.ok()) return error_;
    if (max_blocks_per_layer_ != 0 && resident_->num_blocks(layer) >= max_blocks_per_layer_) {
      return absl::OutOfRangeError(absl::StrCat("AppendBlock: layer ", layer, " of sequence ", id_,
                                                " already has max_blocks_per_layer (",
                                                max_blocks_per_layer_, ") blocks"));
    }
    if (absl::Status status = resident_->TakeSlots(layer, 1, &slots); !status.ok()) {
      return absl::Status(status.code(),
                          absl::StrCat("decode block of layer ", layer, ": ", status.message()));
    }
  }
  char* slot = SlotAddress(slots[0]);
  absl::Status status = backend_->Copy(slot, MemoryKind::kDevice, key, where, key_bytes_, stream);
  if (status.ok()) {
    status =
        backend_->Copy(slot + key_bytes_, MemoryKind::kDevice, value, where, key_bytes_, stream);
  }
  absl::StatusOr<EventHandle> copied =
      status.ok() ? backend_->RecordEvent(stream) : absl::StatusOr<EventHandle>(status);
  uint32_t block_index = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!copied.ok()) {
      resident_->GiveSlots(slots);
      return copied.status();
    }
    // The index is taken after the copy: AppendBlock is the decode thread's call, so the
    // layer's next index has not moved since the max_blocks_per_layer check.
    block_index = resident_->AppendBlock(layer, slots[0], *copied);
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
  // Due at the client's step `slot` (mod stride): this sequence's step s is the client's
  // `now + s`, so s is due when (s + now - slot) % stride == 0. (A Step racing with this Seal
  // shifts the slot by one; engines seal and step on one thread.)
  const auto [slot, now] = client_->DueSlotForSeal(config_.retrieval_stride);
  const uint32_t stride = config_.retrieval_stride;
  phase_.store(static_cast<uint32_t>((now % stride + stride - slot) % stride),
               std::memory_order_relaxed);
  due_slot_.store(slot, std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    resident_->NoteBlocks(layer, response->num_blocks());
    if (resident_->has_pending(layer)) {
      if (absl::Status status = backend_->WaitEvent(resident_->pending_load_event(layer));
          !status.ok()) {
        return status;
      }
    }
    PublishReadyLocked(layer);
    if (resident_->has_pending(layer)) {
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
    end_step = LastDueStep(decode_step_);
  }
  if (end_step == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("Reseal needs a window of retrieval_stride (", config_.retrieval_stride,
                     ") decode steps recorded since the Seal and ending at a due step"));
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
    std::swap(copied, query_events_[((Clock(end_step) - 1) / stride) % 2]);
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
  EventHandle& window_event = query_events_[(Clock(decode_step_) / config_.retrieval_stride) % 2];
  backend_->ReleaseEvent(window_event);
  window_event = *copied;
  return absl::OkStatus();
}

absl::StatusOr<SlotTable> SequenceImpl::Acquire(uint32_t layer, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
  if (!sealed_) return absl::FailedPreconditionError("Acquire before Seal");
  absl::StatusOr<SlotTable> table = resident_->Acquire(layer, stream);
  if (table.ok()) table->step = decode_step_;
  return table;
}

absl::Status SequenceImpl::Release(uint32_t layer, void* stream) {
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  absl::MutexLock lock(&mu_);
  return resident_->Release(layer, stream);
}

SequenceStats SequenceImpl::stats() const {
  absl::MutexLock lock(&mu_);
  SequenceStats stats = stats_;
  stats.decode_step = decode_step_;
  const SlotPool::HolderStats held = resident_->pool_stats();
  stats.reserved_slots = held.reserved_slots;
  stats.slots_held = held.slots_held;
  stats.peak_slots_held = held.peak_slots_held;
  return stats;
}

void SequenceImpl::PublishReadyLocked(uint32_t layer) {
  const std::optional<uint64_t> published = resident_->PublishReady(layer);
  if (!published.has_value()) return;
  ++stats_.selections_published;
  stats_.last_staleness_steps = decode_step_ - std::min(decode_step_, *published);
  stats_.max_staleness_steps = std::max(stats_.max_staleness_steps, stats_.last_staleness_steps);
}

bool SequenceImpl::AdvanceStep() {
  absl::MutexLock lock(&mu_);
  if (!sealed_) return false;
  ++decode_step_;
  for (uint32_t layer = 0; layer < profile_.num_layers; ++layer) {
    PublishReadyLocked(layer);
    // Slots nothing reads any more go back now, for any sequence of the pool to use.
    resident_->ReclaimRetired(layer);
  }
  if (LastDueStep(decode_step_) != decode_step_) return false;
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
    v1::HeldBlocks* held = request->add_held();
    held->set_layer(layer);
    for (uint32_t block : resident_->Held(layer)) held->add_block_indices(block);
    (*known_blocks)[layer] = resident_->num_blocks(layer);
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

absl::Status SequenceImpl::LoadSelection(uint32_t layer, std::vector<uint32_t> blocks,
                                         uint32_t known_blocks, uint64_t selection_step,
                                         std::vector<v1::Block> data,
                                         std::shared_ptr<const BlockDataPlane> plane) {
  if (plane == nullptr) plane = GrpcBytesDataPlane();
  if (absl::Status status = CheckLayer(layer); !status.ok()) return status;
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  std::vector<uint32_t> needed;
  {
    absl::MutexLock lock(&mu_);
    needed = resident_->NotResident(layer, blocks);
  }
  // Bytes of each needed block: from the reply (in it or in the segment), else fetched.
  std::map<uint32_t, const v1::Block*> by_index;
  for (const v1::Block& block : data) {
    if (block.layer() != layer) continue;
    // A region of a segment this client has not mapped (the server restarted): fetch it.
    if (!plane->Readable(block)) continue;
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
  // Where each needed block's K then V lie: in the segment (copied from there) or in a message.
  std::vector<const char*> sources;
  for (uint32_t block : needed) {
    auto found = by_index.find(block);
    if (found == by_index.end()) {
      return absl::DataLossError(absl::StrCat("block ", block, " of layer ", layer,
                                              " was selected but its bytes never came"));
    }
    absl::StatusOr<const char*> source = plane->Locate(*found->second, key_bytes_);
    if (!source.ok()) return source.status();
    sources.push_back(*source);
  }
  if (blocks.size() > resident_capacity_) {
    absl::MutexLock lock(&mu_);
    ++stats_.selections_dropped;
    return absl::ResourceExhaustedError(absl::StrCat(
        "selection of layer ", layer, " of sequence ", id_, " has ", blocks.size(),
        " blocks, more than a table holds (", resident_capacity_,
        max_blocks_per_layer_ != 0 ? ": max_blocks_per_layer)" : ": slots_per_layer)"));
  }
  std::vector<int32_t> slots;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status status = resident_->TakeSlots(layer, needed.size(), &slots); !status.ok()) {
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
  for (const char* source : sources) shared_count += source != nullptr ? 1 : 0;
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
    const ClientOptions& options = client_->options();
    for (size_t i = 0; i < needed.size() && status.ok(); ++i) {
      const v1::Block& block = *by_index[needed[i]];
      const char* bytes = sources[i];
      if (bytes == nullptr) {
        std::memcpy(staged, block.key().data(), key_bytes_);
        std::memcpy(staged + key_bytes_, block.value().data(), key_bytes_);
        bytes = staged;
        staged += slot_bytes_;
      }
      // K then V lie contiguous here (staging or segment), as the checksum covers them.
      const bool verify = sources[i] == nullptr ? options.verify_block_checksums
                                                : options.verify_shared_memory_checksums;
      if (verify && XXH3_64bits(bytes, slot_bytes_) != block.checksum()) {
        status = absl::DataLossError(absl::StrCat(
            "block ", needed[i], " of layer ", layer, " of sequence ", id_,
            " arrived with bytes that do not match its checksum; its selection is dropped"));
        break;
      }
      segments.push_back({SlotAddress(slots[i]), bytes, slot_bytes_});
    }
    if (status.ok()) {
      status = backend_->CopyToDeviceBatch(segments.data(), segments.size(), load_stream_);
    }
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
  // The staging goes back as soon as this layer's copy completed (about a millisecond; the
  // server meanwhile streams the next layer), not when the selection is published: publishing
  // needs the engine's Steps, and a retrieval waiting for staging that only Steps free would
  // hold up the next layers, Flush and DropSequence until the engine steps again.
  if (status.ok() && staging != nullptr) {
    status = backend_->WaitEvent(loaded);
    if (status.ok()) {
      client_->staging()->Release(staging);
      staging = nullptr;
    }
  }
  absl::MutexLock lock(&mu_);
  if (!status.ok()) {
    // A failed copy may have been partly issued: wait for the stream before reusing the slots
    // (or letting the server reuse the regions).
    EventHandle issued = backend_->RecordEvent(load_stream_).value_or(nullptr);
    backend_->WaitEvent(issued).IgnoreError();
    backend_->ReleaseEvent(issued);
    backend_->ReleaseEvent(loaded);
    resident_->GiveSlots(slots);
    if (staging != nullptr) client_->staging()->Release(staging);
    ++stats_.selections_dropped;
    return status;
  }
  stats_.blocks_loaded += needed.size();
  stats_.bytes_loaded += needed.size() * slot_bytes_;
  stats_.blocks_already_resident += blocks.size() - needed.size();
  PendingSelection pending;
  pending.blocks = std::move(blocks);
  pending.known_blocks = known_blocks;
  pending.selection_step = selection_step;
  pending.new_blocks = std::move(needed);
  pending.load_event = loaded;
  if (shared_count > 0) pending.source = std::move(plane);
  resident_->SetPending(layer, std::move(pending), slots);
  if (segment_read != nullptr) {
    // The stream is in order: the latest event covers every earlier copy from the segment.
    backend_->ReleaseEvent(segment_reads_);
    segment_reads_ = segment_read;
  }
  return absl::OkStatus();
}

}  // namespace kvstar::client_internal
