// The C API: status codes out, messages in a thread-local string, handles over the C++ objects.
#include "kvstar/c_api.h"

#include <memory>
#include <string>
#include <utility>

#include "kvstar/client.h"

struct kvstar_client {
  std::unique_ptr<kvstar::Client> client;
};

namespace {

thread_local std::string last_error;

int Report(const absl::Status& status) {
  if (status.ok()) {
    last_error.clear();
    return KVSTAR_OK;
  }
  last_error = status.ToString();
  return static_cast<int>(status.code());
}

int Invalid(const char* message) { return Report(absl::InvalidArgumentError(message)); }

kvstar::Sequence* Unwrap(kvstar_sequence* sequence) {
  return reinterpret_cast<kvstar::Sequence*>(sequence);
}

kvstar::ModelProfile ToProfile(const kvstar_model_profile& profile) {
  kvstar::ModelProfile model;
  model.num_layers = profile.num_layers;
  model.num_q_heads = profile.num_q_heads;
  model.num_kv_heads = profile.num_kv_heads;
  model.head_dim = profile.head_dim;
  model.block_size = profile.block_size == 0 ? 128 : profile.block_size;
  model.dtype = static_cast<kvstar::DType>(profile.dtype);
  return model;
}

kvstar::KvstarConfig ToConfig(const kvstar_config* config) {
  kvstar::KvstarConfig knobs;
  if (config != nullptr) {
    knobs.init_window_sz = config->init_window_sz;
    knobs.local_window_sz = config->local_window_sz;
    knobs.sparse_ratio = config->sparse_ratio;
    knobs.retrieval_stride = config->retrieval_stride;
    knobs.blk_repre_dim_prune_ratio = config->blk_repre_dim_prune_ratio;
    knobs.blk_repre_inner_token_merge = config->blk_repre_inner_token_merge;
    knobs.block_vote = config->block_vote;
    knobs.representation_format = config->representation_format;
  }
  return knobs;
}

kvstar::MemoryKind Where(int where) {
  return where == KVSTAR_DEVICE ? kvstar::MemoryKind::kDevice : kvstar::MemoryKind::kHost;
}

}  // namespace

extern "C" {

const char* kvstar_last_error(void) { return last_error.c_str(); }

void kvstar_config_default(kvstar_config* config) {
  if (config == nullptr) return;
  const kvstar::KvstarConfig defaults;
  config->init_window_sz = defaults.init_window_sz;
  config->local_window_sz = defaults.local_window_sz;
  config->sparse_ratio = defaults.sparse_ratio;
  config->retrieval_stride = defaults.retrieval_stride;
  config->blk_repre_dim_prune_ratio = defaults.blk_repre_dim_prune_ratio;
  config->blk_repre_inner_token_merge = defaults.blk_repre_inner_token_merge;
  config->block_vote = defaults.block_vote;
  config->representation_format = defaults.representation_format;
}

int kvstar_connect(const char* address, int backend, int use_tls, const char* tls_root_pem,
                   const char* bearer_token, kvstar_client** client) {
  return kvstar_connect_tls(address, backend, use_tls, tls_root_pem, nullptr, nullptr, bearer_token,
                            client);
}

int kvstar_connect_tls(const char* address, int backend, int use_tls, const char* tls_root_pem,
                       const char* tls_cert_chain_pem, const char* tls_private_key_pem,
                       const char* bearer_token, kvstar_client** client) {
  if (address == nullptr || client == nullptr) return Invalid("address and client are required");
  if (backend < KVSTAR_BACKEND_AUTO || backend > KVSTAR_BACKEND_CUDA) {
    return Invalid("backend must be KVSTAR_BACKEND_AUTO, _HOST or _CUDA");
  }
  kvstar::ClientOptions options;
  options.address = address;
  options.backend = static_cast<kvstar::BackendKind>(backend);
  options.use_tls = use_tls != 0;
  if (tls_root_pem != nullptr) options.tls_root_certs_pem = tls_root_pem;
  if (tls_cert_chain_pem != nullptr) options.tls_cert_chain_pem = tls_cert_chain_pem;
  if (tls_private_key_pem != nullptr) options.tls_private_key_pem = tls_private_key_pem;
  if (bearer_token != nullptr) options.bearer_token = bearer_token;
  absl::StatusOr<std::unique_ptr<kvstar::Client>> connected = kvstar::Client::Connect(options);
  if (!connected.ok()) return Report(connected.status());
  *client = new kvstar_client{std::move(*connected)};
  return Report(absl::OkStatus());
}

void kvstar_client_destroy(kvstar_client* client) { delete client; }

int kvstar_client_backend(const kvstar_client* client) {
  return client == nullptr ? -1 : static_cast<int>(client->client->backend());
}

int kvstar_step(kvstar_client* client) {
  if (client == nullptr) return Invalid("client is NULL");
  return Report(client->client->Step());
}

int kvstar_client_flush(kvstar_client* client) {
  if (client == nullptr) return Invalid("client is NULL");
  return Report(client->client->Flush());
}

int kvstar_reconnect(kvstar_client* client, const char* address) {
  if (client == nullptr || address == nullptr) return Invalid("client and address are required");
  return Report(client->client->Reconnect(address));
}

int kvstar_create_sequence(kvstar_client* client, const char* sequence_id,
                           const kvstar_model_profile* profile, const kvstar_config* config,
                           uint32_t slots_per_layer, uint32_t max_blocks_per_layer, void* slot_pool,
                           uint64_t slot_pool_bytes, kvstar_sequence** sequence) {
  if (client == nullptr || sequence_id == nullptr || profile == nullptr || sequence == nullptr) {
    return Invalid("client, sequence_id, profile and sequence are required");
  }
  const kvstar::ModelProfile model = ToProfile(*profile);
  const kvstar::KvstarConfig knobs = ToConfig(config);
  kvstar::SequenceOptions options;
  options.slots_per_layer = slots_per_layer;
  options.max_blocks_per_layer = max_blocks_per_layer;
  options.slot_pool = slot_pool;
  options.slot_pool_bytes = slot_pool_bytes;
  absl::StatusOr<kvstar::Sequence*> created =
      client->client->CreateSequence(sequence_id, model, knobs, options);
  if (!created.ok()) return Report(created.status());
  *sequence = reinterpret_cast<kvstar_sequence*>(*created);
  return Report(absl::OkStatus());
}

uint64_t kvstar_reserved_slots(const kvstar_model_profile* profile, const kvstar_config* config,
                               uint32_t max_blocks_per_layer) {
  if (profile == nullptr) return 0;
  return kvstar::ReservedSlots(ToProfile(*profile), ToConfig(config), max_blocks_per_layer);
}

int kvstar_slot_pool_for(const kvstar_model_profile* profile, const kvstar_config* config,
                         uint32_t max_blocks_per_layer, uint32_t max_sequences,
                         double headroom_fraction, kvstar_slot_pool_options* options) {
  if (profile == nullptr || options == nullptr) return Invalid("profile and options are required");
  const kvstar::SlotPoolOptions sized =
      kvstar::SlotPoolFor(ToProfile(*profile), ToConfig(config), max_blocks_per_layer,
                          max_sequences, headroom_fraction);
  *options =
      kvstar_slot_pool_options{sized.slot_bytes, sized.num_slots, sized.headroom_slots, nullptr, 0};
  return Report(absl::OkStatus());
}

int kvstar_create_slot_pool(kvstar_client* client, const kvstar_slot_pool_options* options) {
  if (client == nullptr || options == nullptr) return Invalid("client and options are required");
  kvstar::SlotPoolOptions pool;
  pool.slot_bytes = options->slot_bytes;
  pool.num_slots = options->num_slots;
  pool.headroom_slots = options->headroom_slots;
  pool.memory = options->memory;
  pool.memory_bytes = options->memory_bytes;
  return Report(client->client->CreateSlotPool(pool));
}

int kvstar_slot_pool_stats_get(const kvstar_client* client, kvstar_slot_pool_stats* stats) {
  if (client == nullptr || stats == nullptr) return Invalid("client and stats are required");
  absl::StatusOr<kvstar::SlotPoolStats> s = client->client->slot_pool_stats();
  if (!s.ok()) return Report(s.status());
  *stats = kvstar_slot_pool_stats{
      s->slot_bytes,   s->num_slots,       s->headroom_slots,    s->reserved_slots,
      s->slots_in_use, s->headroom_in_use, s->peak_slots_in_use, s->peak_headroom_in_use,
      s->sequences,    s->takes_refused};
  return Report(absl::OkStatus());
}

int kvstar_client_stats_get(const kvstar_client* client, kvstar_client_stats* stats) {
  if (client == nullptr || stats == nullptr) return Invalid("client and stats are required");
  const kvstar::ClientStats s = client->client->stats();
  *stats = kvstar_client_stats{
      s.retrievals_sent,        s.retrievals_skipped,    s.retrieve_replies, s.retrievals_completed,
      s.blocks_received_shared, s.blocks_received_bytes, s.retrieve_micros,  s.segment_wait_micros,
      s.first_reply_micros,     s.load_micros,           s.call_end_micros};
  return Report(absl::OkStatus());
}

int kvstar_drop_sequence(kvstar_client* client, const char* sequence_id) {
  if (client == nullptr || sequence_id == nullptr) return Invalid("client and id are required");
  return Report(client->client->DropSequence(sequence_id));
}

int kvstar_offload(kvstar_sequence* sequence, uint32_t layer, uint32_t block_index, const void* key,
                   const void* value, int where, void* stream) {
  if (sequence == nullptr || key == nullptr || value == nullptr) {
    return Invalid("sequence, key and value are required");
  }
  return Report(Unwrap(sequence)->Offload(layer, block_index, key, value, Where(where), stream));
}

int kvstar_append_block(kvstar_sequence* sequence, uint32_t layer, const void* key,
                        const void* value, int where, void* stream) {
  if (sequence == nullptr || key == nullptr || value == nullptr) {
    return Invalid("sequence, key and value are required");
  }
  return Report(Unwrap(sequence)->AppendBlock(layer, key, value, Where(where), stream));
}

int kvstar_flush(kvstar_sequence* sequence) {
  if (sequence == nullptr) return Invalid("sequence is NULL");
  return Report(Unwrap(sequence)->Flush());
}

int kvstar_seal(kvstar_sequence* sequence, const void* queries, uint32_t num_queries, int where,
                void* stream) {
  if (sequence == nullptr || (queries == nullptr && num_queries > 0)) {
    return Invalid("sequence and queries are required");
  }
  return Report(Unwrap(sequence)->Seal(queries, num_queries, Where(where), stream));
}

int kvstar_reseal(kvstar_sequence* sequence) {
  if (sequence == nullptr) return Invalid("sequence is NULL");
  return Report(Unwrap(sequence)->Reseal());
}

int kvstar_record_query(kvstar_sequence* sequence, uint32_t layer, const void* query, int where,
                        void* stream) {
  if (sequence == nullptr || query == nullptr) return Invalid("sequence and query are required");
  return Report(Unwrap(sequence)->RecordQuery(layer, query, Where(where), stream));
}

int kvstar_acquire(kvstar_sequence* sequence, uint32_t layer, void* stream,
                   kvstar_slot_table* table) {
  if (sequence == nullptr || table == nullptr) return Invalid("sequence and table are required");
  absl::StatusOr<kvstar::SlotTable> acquired = Unwrap(sequence)->Acquire(layer, stream);
  if (!acquired.ok()) return Report(acquired.status());
  table->layer = acquired->layer;
  table->count = acquired->count;
  table->step = acquired->step;
  table->device_slots = acquired->device_slots;
  table->host_slots = acquired->host_slots;
  table->block_indices = acquired->block_indices;
  table->slot_pool = acquired->slot_pool;
  table->slot_bytes = acquired->slot_bytes;
  table->slots_per_layer = acquired->slots_per_layer;
  table->reserved = 0;
  table->selection_step = acquired->selection_step;
  return Report(absl::OkStatus());
}

int kvstar_release(kvstar_sequence* sequence, uint32_t layer, void* stream) {
  if (sequence == nullptr) return Invalid("sequence is NULL");
  return Report(Unwrap(sequence)->Release(layer, stream));
}

int kvstar_sequence_stats_get(const kvstar_sequence* sequence, kvstar_sequence_stats* stats) {
  if (sequence == nullptr || stats == nullptr) return Invalid("sequence and stats are required");
  const kvstar::SequenceStats s = reinterpret_cast<const kvstar::Sequence*>(sequence)->stats();
  *stats =
      kvstar_sequence_stats{s.blocks_offloaded,   s.unacknowledged_blocks,   s.blocks_loaded,
                            s.bytes_loaded,       s.blocks_already_resident, s.selections_published,
                            s.selections_dropped, s.last_staleness_steps,    s.max_staleness_steps,
                            s.decode_step,        s.reserved_slots,          s.slots_held,
                            s.peak_slots_held};
  return Report(absl::OkStatus());
}

}  // extern "C"
