// Model shape and retrieval knobs shared by every part of retrieval/, and their validation.
#ifndef KVSTAR_RETRIEVAL_MODEL_SHAPE_H_
#define KVSTAR_RETRIEVAL_MODEL_SHAPE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace kvstar::retrieval {

// Element type of K, V and queries as the engine hands them over.
enum class DType { kBf16, kFp16, kFp32 };

// Bytes per element of `dtype`.
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

struct ModelShape {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t block_size = 128;  // tokens per block
  DType dtype = DType::kBf16;

  uint32_t group_size() const { return num_q_heads / num_kv_heads; }
  // Bytes of one block of K (or V) of one layer: [block_size][num_kv_heads][head_dim].
  size_t key_block_bytes() const {
    return size_t{block_size} * num_kv_heads * head_dim * DTypeSize(dtype);
  }
  // Bytes of one layer's queries for `num_queries` tokens: [num_queries][num_q_heads][head_dim].
  size_t query_bytes(uint32_t num_queries) const {
    return size_t{num_queries} * num_q_heads * head_dim * DTypeSize(dtype);
  }
};

// How a KV head's query rows vote for blocks (see BlockVote in kvstar.proto).
enum class BlockVote : uint32_t { kSum = 0, kMax = 1 };

// How block representations are stored and scanned (see RepresentationFormat in kvstar.proto).
// kBf16 is the reference; kInt8 stores each vector as int8 codes with one fp32 scale (symmetric,
// max |value| -> 127) and scores with 8-bit dot products on queries quantized the same way.
enum class RepresentationFormat : uint32_t { kBf16 = 0, kInt8 = 1 };

const char* RepresentationFormatName(RepresentationFormat format);

// Queries a Seal may score with (the prompt's last ones), whatever retrieval_stride is.
inline constexpr uint32_t kMaxSealQueries = 128;

// Names kept from the original KVstar configuration.
struct Knobs {
  uint32_t init_window_sz = 1;    // first blocks, always selected
  uint32_t local_window_sz = 2;   // last blocks, always selected
  float sparse_ratio = 0.25f;     // fraction of the middle blocks selected
  uint32_t retrieval_stride = 8;  // decode steps between retrievals = max queries per retrieval
  float blk_repre_dim_prune_ratio = 0.25f;   // fraction of head_dim channels kept
  uint32_t blk_repre_inner_token_merge = 2;  // adjacent tokens averaged into one vector
  BlockVote block_vote = BlockVote::kSum;    // sum or max of the rows' shares of a block
  RepresentationFormat representation_format = RepresentationFormat::kBf16;

  // Most queries one scoring call takes: a Retrieve sends at most retrieval_stride, a Seal up to
  // this many (the prompt's last queries).
  uint32_t max_seal_queries() const {
    return retrieval_stride > kMaxSealQueries ? retrieval_stride : kMaxSealQueries;
  }
  // Representation vectors per block: block_size / blk_repre_inner_token_merge.
  uint32_t vectors_per_block(const ModelShape& shape) const {
    return shape.block_size / blk_repre_inner_token_merge;
  }
  // Channels kept per (layer, KV head): round(head_dim * prune ratio), at least 1.
  uint32_t kept_channels(const ModelShape& shape) const;
};

// Returns InvalidArgument naming the first bad field and its value: zero sizes, q heads not a
// multiple of KV heads, a merge factor not dividing block_size, ratios outside (0, 1], kept
// channels rounding to 0, a zero retrieval stride.
absl::Status ValidateShapeAndKnobs(const ModelShape& shape, const Knobs& knobs);

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_MODEL_SHAPE_H_
