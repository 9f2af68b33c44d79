// Plain scalar reference of the whole retrieval pipeline, for tests: no SIMD, no fusion, an
// ordinary softmax over a materialised score matrix.
#ifndef KVSTAR_RETRIEVAL_REFERENCE_H_
#define KVSTAR_RETRIEVAL_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "retrieval/model_shape.h"

namespace kvstar::retrieval {

// Kept channel ids of one layer, [num_kv_heads][kept], ascending per head.
std::vector<uint32_t> ReferenceKeptChannels(const ModelShape& shape, const Knobs& knobs,
                                            absl::Span<const absl::Span<const uint8_t>> key_blocks);

// Representation of one layer per KV head, [num_kv_heads][blocks][M][kept], values rounded to
// bf16 exactly as SequenceIndex stores them (returned widened to fp32); with representation_format
// kInt8, each vector's QuantizeSymmetricInt8 codes times its scale.
std::vector<float> ReferenceRepresentation(const ModelShape& shape, const Knobs& knobs,
                                           absl::Span<const absl::Span<const uint8_t>> key_blocks,
                                           absl::Span<const uint32_t> kept_channels);

// Block scores of one layer: materialised S = Q R^T / sqrt(head_dim) per KV head, softmax per
// row in double, summed over each block's vectors, rows and heads. With representation_format
// kInt8 each query row (on the kept channels) is quantized by QuantizeQueryInt8 first.
std::vector<float> ReferenceScores(const ModelShape& shape, const Knobs& knobs,
                                   absl::Span<const float> representation,
                                   absl::Span<const uint32_t> kept_channels, uint32_t num_blocks,
                                   absl::Span<const uint8_t> queries, uint32_t num_queries);

// Selection by full sort: windows plus the top ceil(n_middle * sparse_ratio) middle blocks.
std::vector<uint32_t> ReferenceSelect(absl::Span<const float> block_scores, const Knobs& knobs);

// The whole pipeline for one layer: channels, representation, scores, selection.
std::vector<uint32_t> ReferenceRetrieveLayer(const ModelShape& shape, const Knobs& knobs,
                                             absl::Span<const absl::Span<const uint8_t>> key_blocks,
                                             absl::Span<const uint8_t> queries,
                                             uint32_t num_queries);

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_REFERENCE_H_
