// Request validation for the kvstar service: pure functions from protobuf messages to statuses
// whose messages name the bad field and its value. No I/O, no state: safe from any thread.
#ifndef KVSTAR_SERVER_VALIDATION_H_
#define KVSTAR_SERVER_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvstar/v1/kvstar.pb.h"
#include "retrieval/model_shape.h"

namespace kvstar::server {

// Limits that bound what one request may ask for.
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = 1024;
inline constexpr uint32_t kMaxBlockSize = 65536;
inline constexpr uint32_t kDefaultBlockSize = 128;
// 2^20 blocks of 128 tokens is 134M tokens per sequence: far beyond any context, small enough
// that block arithmetic never overflows.
inline constexpr uint32_t kMaxBlocksPerLayer = 1u << 20;
// The POSIX store turns keys (tenant + id) into directory names of at most 127 bytes.
inline constexpr size_t kMaxSequenceIdBytes = 100;
// K plus V of one block of one layer. Every message, cache entry and segment holds whole blocks;
// a profile whose block exceeds this could never be stored (the largest in-range one is 512 GiB).
inline constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 30;

// Bytes of one element of `dtype`, or 0 for DTYPE_UNSPECIFIED / unknown values.
uint32_t DTypeBytes(v1::DType dtype);

// Bytes of K (equally of V) of one block of `profile`. REQUIRES: profile is valid.
uint64_t BlockKeyBytes(const v1::ModelProfile& profile);

// Bytes of one query row set [num_q_heads][head_dim] of `profile`. REQUIRES: profile is valid.
uint64_t QueryRowBytes(const v1::ModelProfile& profile);

// InvalidArgument naming sequence_id unless it is 1..kMaxSequenceIdBytes bytes of valid UTF-8
// without control characters (which would let an id forge lines in logs). Messages escape the id.
// Over gRPC, protobuf's parser already refuses invalid UTF-8 in a proto3 string field, before
// any handler runs (gRPC answers INTERNAL with an empty message: issue 11); this check is for
// callers of the core that do not come through that parser.
absl::Status ValidateSequenceId(absl::string_view sequence_id);

// Checks a profile and returns it with defaults filled in (block_size 0 -> 128). One block (K+V)
// may be at most kMaxBlockBytes.
absl::StatusOr<v1::ModelProfile> NormalizeProfile(const v1::ModelProfile& profile);

// Checks the knobs against a normalized profile and returns them with every field set.
absl::StatusOr<v1::KvstarConfig> NormalizeConfig(const v1::KvstarConfig& config,
                                                 const v1::ModelProfile& profile);

// The retrieval engine's view of a normalized profile and config.
retrieval::ModelShape ToModelShape(const v1::ModelProfile& profile);
retrieval::Knobs ToKnobs(const v1::KvstarConfig& config);

// Checks one LayerQueries of a Seal or Retrieve: layer in range, 1..max_queries queries (a
// Retrieve's retrieval_stride; a Seal's up to max(retrieval_stride, kMaxSealQueries)), and exactly
// num_queries x num_q_heads x head_dim elements. `where` prefixes the message.
absl::Status ValidateLayerQueries(const v1::LayerQueries& queries, const v1::ModelProfile& profile,
                                  uint32_t max_queries, absl::string_view where);

// Checks one block against its sequence's profile: layer and index in range, K and V sizes.
// `where` prefixes the message (e.g. "blocks[3]"). Checksums are the store's to verify.
absl::Status ValidateBlock(const v1::Block& block, const v1::ModelProfile& profile,
                           absl::string_view where);

// Checks a block reference's layer and index ranges.
absl::Status ValidateBlockRef(uint32_t layer, uint32_t block_index, const v1::ModelProfile& profile,
                              absl::string_view where);

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_VALIDATION_H_
