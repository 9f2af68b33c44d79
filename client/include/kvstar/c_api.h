/* kvstar client, C API: plain functions over the C++ API in kvstar/client.h, for engines written
 * in C or driven from Python through ctypes (libkvstar_client.so). Read client.h for the
 * semantics of each call; this header only says how they map.
 *
 * - Handles are opaque. A kvstar_sequence belongs to its kvstar_client and is valid until
 *   kvstar_drop_sequence or kvstar_client_destroy.
 * - Every function returning int returns 0 (KVSTAR_OK) or an absl::StatusCode / gRPC code value
 *   (e.g. 3 INVALID_ARGUMENT, 5 NOT_FOUND, 9 FAILED_PRECONDITION, 14 UNAVAILABLE). The message of
 * the last failure on the calling thread is kvstar_last_error() (thread-local; "" after success).
 * - `where`: 0 host pointer, 1 device pointer. `stream`: a cudaStream_t or NULL.
 * - Thread-safety: as in client.h.
 */
#ifndef KVSTAR_CLIENT_INCLUDE_KVSTAR_C_API_H_
#define KVSTAR_CLIENT_INCLUDE_KVSTAR_C_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVSTAR_OK 0
#define KVSTAR_HOST 0
#define KVSTAR_DEVICE 1
#define KVSTAR_BACKEND_AUTO 0
#define KVSTAR_BACKEND_HOST 1
#define KVSTAR_BACKEND_CUDA 2
#define KVSTAR_DTYPE_BF16 1
#define KVSTAR_DTYPE_FP16 2
#define KVSTAR_DTYPE_FP32 3

typedef struct kvstar_client kvstar_client;
typedef struct kvstar_sequence kvstar_sequence;

typedef struct {
  uint32_t num_layers;
  uint32_t num_q_heads;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t block_size; /* 0 means 128 */
  uint32_t dtype;      /* KVSTAR_DTYPE_* */
} kvstar_model_profile;

typedef struct {
  uint32_t init_window_sz;
  uint32_t local_window_sz;
  float sparse_ratio;
  uint32_t retrieval_stride;
  float blk_repre_dim_prune_ratio;
  uint32_t blk_repre_inner_token_merge;
  uint32_t block_vote;            /* 0 sum (default), 1 max: see KvstarConfig in client.h */
  uint32_t representation_format; /* 0 bf16 (default), 1 int8: see KvstarConfig in client.h */
} kvstar_config;

typedef struct {
  uint32_t layer;
  uint32_t count;
  uint64_t step;
  const int32_t* device_slots;
  const int32_t* host_slots;
  const uint32_t* block_indices;
  void* slot_pool;
  uint64_t slot_bytes;
  uint32_t slots_per_layer;
  uint32_t reserved;
  uint64_t selection_step;
} kvstar_slot_table;

typedef struct {
  uint64_t blocks_offloaded;
  uint64_t unacknowledged_blocks;
  uint64_t blocks_loaded;
  uint64_t bytes_loaded;
  uint64_t blocks_already_resident;
  uint64_t selections_published;
  uint64_t selections_dropped;
  uint64_t last_staleness_steps;
  uint64_t max_staleness_steps;
  uint64_t decode_step;
  uint64_t reserved_slots;
  uint64_t slots_held;
  uint64_t peak_slots_held;
} kvstar_sequence_stats;

/* SlotPoolOptions in client.h: one pool shared by every sequence of the client. */
typedef struct {
  uint64_t slot_bytes; /* K + V of one block: 2 * block_size * num_kv_heads * head_dim * dtype */
  uint64_t num_slots;  /* headroom included */
  uint64_t headroom_slots; /* unreserved, shared by all sequences for loads in flight */
  void* memory;            /* engine memory of num_slots * slot_bytes bytes, or NULL */
  uint64_t memory_bytes;
} kvstar_slot_pool_options;

/* SlotPoolStats in client.h. */
typedef struct {
  uint64_t slot_bytes;
  uint64_t num_slots;
  uint64_t headroom_slots;
  uint64_t reserved_slots;
  uint64_t slots_in_use;
  uint64_t headroom_in_use;
  uint64_t peak_slots_in_use;
  uint64_t peak_headroom_in_use;
  uint64_t sequences;
  uint64_t takes_refused;
} kvstar_slot_pool_stats;

/* ClientStats in client.h: retrievals and how their blocks came. */
typedef struct {
  uint64_t retrievals_sent;
  uint64_t retrievals_skipped;
  uint64_t retrieve_replies;
  uint64_t retrievals_completed;
  uint64_t blocks_received_shared;
  uint64_t blocks_received_bytes;
  uint64_t retrieve_micros;
  uint64_t segment_wait_micros;
  uint64_t first_reply_micros;
  uint64_t load_micros;
  uint64_t call_end_micros;
} kvstar_client_stats;

/* The message of the last failed call on this thread ("" when it succeeded). */
const char* kvstar_last_error(void);

/* The server's defaults (block 1 / local 2 / 0.25 / stride 8 / 0.25 / 2 / sum). */
void kvstar_config_default(kvstar_config* config);

/* tls_root_pem and bearer_token may be NULL. backend: KVSTAR_BACKEND_*. */
int kvstar_connect(const char* address, int backend, int use_tls, const char* tls_root_pem,
                   const char* bearer_token, kvstar_client** client);
/* kvstar_connect plus the client's own PEM certificate chain and key, for servers that require
   client certificates; both NULL or both set, and then use_tls must be 1. */
int kvstar_connect_tls(const char* address, int backend, int use_tls, const char* tls_root_pem,
                       const char* tls_cert_chain_pem, const char* tls_private_key_pem,
                       const char* bearer_token, kvstar_client** client);
void kvstar_client_destroy(kvstar_client* client);
/* KVSTAR_BACKEND_HOST or KVSTAR_BACKEND_CUDA. */
int kvstar_client_backend(const kvstar_client* client);
int kvstar_step(kvstar_client* client);
int kvstar_client_flush(kvstar_client* client);
int kvstar_reconnect(kvstar_client* client, const char* address);

/* ReservedSlots in client.h (config NULL: defaults); 0 for a NULL profile. */
uint64_t kvstar_reserved_slots(const kvstar_model_profile* profile, const kvstar_config* config,
                               uint32_t max_blocks_per_layer);
/* SlotPoolFor in client.h: fills *options (memory NULL). config NULL: defaults. */
int kvstar_slot_pool_for(const kvstar_model_profile* profile, const kvstar_config* config,
                         uint32_t max_blocks_per_layer, uint32_t max_sequences,
                         double headroom_fraction, kvstar_slot_pool_options* options);
/* Client::CreateSlotPool: before the first kvstar_create_sequence. */
int kvstar_create_slot_pool(kvstar_client* client, const kvstar_slot_pool_options* options);
/* Client::slot_pool_stats: 9 FAILED_PRECONDITION without a shared pool. */
int kvstar_slot_pool_stats_get(const kvstar_client* client, kvstar_slot_pool_stats* stats);
int kvstar_client_stats_get(const kvstar_client* client, kvstar_client_stats* stats);

/* config NULL: defaults. With a shared pool: slots_per_layer 0, slot_pool NULL and
 * max_blocks_per_layer > 0. Without one, slot_pool NULL: the library allocates the sequence's
 * own slots. */
int kvstar_create_sequence(kvstar_client* client, const char* sequence_id,
                           const kvstar_model_profile* profile, const kvstar_config* config,
                           uint32_t slots_per_layer, uint32_t max_blocks_per_layer, void* slot_pool,
                           uint64_t slot_pool_bytes, kvstar_sequence** sequence);
int kvstar_drop_sequence(kvstar_client* client, const char* sequence_id);

int kvstar_offload(kvstar_sequence* sequence, uint32_t layer, uint32_t block_index, const void* key,
                   const void* value, int where, void* stream);
int kvstar_append_block(kvstar_sequence* sequence, uint32_t layer, const void* key,
                        const void* value, int where, void* stream);
int kvstar_flush(kvstar_sequence* sequence);
int kvstar_seal(kvstar_sequence* sequence, const void* queries, uint32_t num_queries, int where,
                void* stream);
int kvstar_reseal(kvstar_sequence* sequence);
int kvstar_record_query(kvstar_sequence* sequence, uint32_t layer, const void* query, int where,
                        void* stream);
int kvstar_acquire(kvstar_sequence* sequence, uint32_t layer, void* stream,
                   kvstar_slot_table* table);
int kvstar_release(kvstar_sequence* sequence, uint32_t layer, void* stream);
int kvstar_sequence_stats_get(const kvstar_sequence* sequence, kvstar_sequence_stats* stats);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSTAR_CLIENT_INCLUDE_KVSTAR_C_API_H_ */
