// Per-sequence block representations: pruned channels and merged tokens of every sealed K block.
#ifndef KVSTAR_RETRIEVAL_REPRESENTATION_H_
#define KVSTAR_RETRIEVAL_REPRESENTATION_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "retrieval/model_shape.h"

namespace kvstar::retrieval {

// The retrieval index of one sequence. For every (layer, KV head) it holds
//  - the kept channel ids: the round(head_dim * blk_repre_dim_prune_ratio) channels with the
//    largest mean |K| over the tokens sealed at SealLayer (ties: lower id), ascending;
//  - the representation [blocks][M][kept], M = block_size / blk_repre_inner_token_merge: each
//    vector is the mean of `merge` adjacent tokens' keys on the kept channels.
// Representations are stored as bf16 (round to nearest even from fp32 means): the scan is bound
// by memory bandwidth on a large host, bf16 halves its bytes, and bf16's 8-bit mantissa is far
// finer than what block ranking needs. Scoring widens to fp32 and accumulates in fp32.
//
// Thread-compatible: the caller serializes SealLayer/AppendBlock against everything else on the
// same index; concurrent const calls (scoring) are safe.
class SequenceIndex {
 public:
  // Returns InvalidArgument when ValidateShapeAndKnobs fails.
  static absl::StatusOr<std::unique_ptr<SequenceIndex>> Create(const ModelShape& shape,
                                                               const Knobs& knobs);

  // Builds `layer` from its sealed blocks, in block order; each span holds one block's K,
  // shape().key_block_bytes() bytes, layout [block_size][num_kv_heads][head_dim] in dtype.
  // Chooses the kept channels from these blocks and replaces anything the layer held.
  // InvalidArgument on a bad layer or block size; the layer is unchanged then.
  absl::Status SealLayer(uint32_t layer, absl::Span<const absl::Span<const uint8_t>> key_blocks);

  // As SealLayer, with the kept channels given: [num_kv_heads][kept] ids < head_dim, distinct
  // within a head (stored ascending).
  absl::Status SealLayerWithChannels(uint32_t layer,
                                     absl::Span<const absl::Span<const uint8_t>> key_blocks,
                                     absl::Span<const uint32_t> kept_channels);

  // Appends one decode-generated block to `layer`, reusing the layer's kept channels.
  // FailedPrecondition if the layer was never sealed.
  absl::Status AppendBlock(uint32_t layer, absl::Span<const uint8_t> key_block);

  const ModelShape& shape() const { return shape_; }
  const Knobs& knobs() const { return knobs_; }
  uint32_t kept() const { return kept_; }
  uint32_t vectors_per_block() const { return vectors_per_block_; }
  bool sealed(uint32_t layer) const { return layers_[layer].sealed; }
  uint32_t num_blocks(uint32_t layer) const { return layers_[layer].num_blocks; }
  // Ascending kept channel ids of (layer, kv_head).
  absl::Span<const uint32_t> kept_channels(uint32_t layer, uint32_t kv_head) const;
  // bf16 bits, [num_blocks][vectors_per_block][kept].
  absl::Span<const uint16_t> representation(uint32_t layer, uint32_t kv_head) const;
  // Bytes of all representations (what one retrieval of every layer scans).
  size_t representation_bytes() const;

 private:
  struct Layer {
    bool sealed = false;
    uint32_t num_blocks = 0;
    std::vector<uint32_t> kept_channels;            // [num_kv_heads][kept]
    std::vector<std::vector<uint16_t>> vectors;     // per KV head: [blocks][M][kept] bf16
  };

  SequenceIndex(const ModelShape& shape, const Knobs& knobs);
  absl::Status CheckBlocks(uint32_t layer,
                           absl::Span<const absl::Span<const uint8_t>> key_blocks) const;
  // Appends the merged, pruned vectors of one block to every head of `layer`.
  void AppendVectors(Layer& layer, absl::Span<const uint8_t> key_block);

  ModelShape shape_;
  Knobs knobs_;
  uint32_t kept_;
  uint32_t vectors_per_block_;
  std::vector<Layer> layers_;
  std::vector<float> block_f32_;  // scratch: one block widened to fp32
};

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_REPRESENTATION_H_
