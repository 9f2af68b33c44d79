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
//  - the representation: for every block, M = block_size / blk_repre_inner_token_merge vectors on
//    the kept channels, each the mean of `merge` adjacent tokens' keys.
// Representations are stored as bf16 (round to nearest even from fp32 means): the scan is bound
// by memory bandwidth on a large host, bf16 halves its bytes, and bf16's 8-bit mantissa is far
// finer than what block ranking needs. Scoring widens to fp32 and accumulates in fp32.
//
// Stored order (see representation_offset): blocks in groups of kBlocksPerGroup, the blocks of a
// group interleaved innermost, [group][M][kept / 2 rounded up][kBlocksPerGroup][2 channels]. The
// scorer puts blocks in SIMD lanes (no lane is idle whatever the query count), and a 32-bit
// word holding two channels widens to two fp32 vectors with one shift and one mask.
// Unused slots (blocks past num_blocks in the last group, the odd channel's partner) are zero.
//
// Thread-compatible: SealLayer/AppendBlock of one layer must not run concurrently with anything
// else touching that layer, but calls for different layers may run concurrently; concurrent
// const calls (scoring) are safe.
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
  // Blocks per group of the stored order: 16 fp32 lanes, the widest vector the scorer uses.
  static constexpr uint32_t kBlocksPerGroup = 16;

  uint32_t kept() const { return kept_; }
  // Channel pairs per vector, kept() / 2 rounded up.
  uint32_t kept_pairs() const { return (kept_ + 1) / 2; }
  uint32_t vectors_per_block() const { return vectors_per_block_; }
  bool sealed(uint32_t layer) const { return layers_[layer].sealed; }
  uint32_t num_blocks(uint32_t layer) const { return layers_[layer].num_blocks; }
  // Ascending kept channel ids of (layer, kv_head).
  absl::Span<const uint32_t> kept_channels(uint32_t layer, uint32_t kv_head) const;
  // bf16 bits of (layer, kv_head) in the stored order above: ceil(num_blocks / kBlocksPerGroup)
  // groups of kBlocksPerGroup * vectors_per_block * kept_pairs * 2 values. Empty if unsealed.
  absl::Span<const uint16_t> representation(uint32_t layer, uint32_t kv_head) const;
  // Index in representation() of vector `vector` (< vectors_per_block), kept channel `channel`
  // (< kept, in kept_channels order) of block `block`.
  size_t representation_offset(uint32_t block, uint32_t vector, uint32_t channel) const {
    const size_t group = block / kBlocksPerGroup;
    return (((group * vectors_per_block_ + vector) * kept_pairs() + channel / 2) * kBlocksPerGroup +
            block % kBlocksPerGroup) *
               2 +
           channel % 2;
  }
  // With knobs().representation_format kInt8 the vectors are stored as 8-bit codes instead
  // (representation() is then empty): codes(layer, kv_head) in the order
  // [group][M][kept / 4 rounded up][kBlocksPerGroup][4 channels] (code_offset), each code the
  // QuantizeSymmetricInt8 code of the fp32 mean plus kInt8CodeOffset (unused slots hold the
  // offset, i.e. 0), and code_scales(layer, kv_head) [group][M][kBlocksPerGroup] (scale_offset),
  // one scale per vector (0 in unused slots). A 512-bit word then holds 4 channels of 16 blocks:
  // one VNNI dot product scores 16 blocks over 4 channels.
  RepresentationFormat format() const { return knobs_.representation_format; }
  uint32_t kept_quads() const { return (kept_ + 3) / 4; }
  absl::Span<const uint8_t> codes(uint32_t layer, uint32_t kv_head) const;
  absl::Span<const float> code_scales(uint32_t layer, uint32_t kv_head) const;
  size_t code_offset(uint32_t block, uint32_t vector, uint32_t channel) const {
    const size_t group = block / kBlocksPerGroup;
    return (((group * vectors_per_block_ + vector) * kept_quads() + channel / 4) * kBlocksPerGroup +
            block % kBlocksPerGroup) *
               4 +
           channel % 4;
  }
  size_t scale_offset(uint32_t block, uint32_t vector) const {
    return (size_t{block / kBlocksPerGroup} * vectors_per_block_ + vector) * kBlocksPerGroup +
           block % kBlocksPerGroup;
  }
  // Codes of one group in codes().
  size_t codes_per_group() const {
    return size_t{kBlocksPerGroup} * vectors_per_block_ * kept_quads() * 4;
  }

  // A copy of representation(layer, kv_head) in plain [num_blocks][vectors_per_block][kept]
  // order (bf16 bits), for baselines and tools that scan rows; allocates. Empty if unsealed.
  // For kInt8, the dequantized vectors (code * scale) rounded to bf16.
  std::vector<uint16_t> RowMajorRepresentation(uint32_t layer, uint32_t kv_head) const;
  // Per group of representation(layer, kv_head): the largest L2 norm of its vectors (bf16 values,
  // rounded up), so a score q.v of any of them is at most |q| * norm. Empty if unsealed.
  absl::Span<const float> group_norms(uint32_t layer, uint32_t kv_head) const;
  // Values of one group in representation().
  size_t values_per_group() const {
    return size_t{kBlocksPerGroup} * vectors_per_block_ * kept_pairs() * 2;
  }
  // Bytes of all representations, last groups' padding included (what one retrieval of every
  // layer scans): bf16 values, or int8 codes plus their scales.
  size_t representation_bytes() const;

 private:
  struct Layer {
    bool sealed = false;
    uint32_t num_blocks = 0;
    std::vector<uint32_t> kept_channels;         // [num_kv_heads][kept]
    std::vector<std::vector<uint16_t>> vectors;  // per KV head, in the stored order
    std::vector<std::vector<float>> norms;       // per KV head: [groups] max vector norm
    std::vector<std::vector<uint8_t>> codes;     // kInt8: per KV head, in the stored order
    std::vector<std::vector<float>> scales;      // kInt8: per KV head, [group][M][16]
  };

  SequenceIndex(const ModelShape& shape, const Knobs& knobs);
  absl::Status CheckBlocks(uint32_t layer,
                           absl::Span<const absl::Span<const uint8_t>> key_blocks) const;
  // Appends the merged, pruned vectors of one block to every head of `layer`; merged_rows is
  // scratch of MergedRowsElems() floats (per call, so different layers can seal concurrently).
  void AppendVectors(Layer& layer, absl::Span<const uint8_t> key_block, float* merged_rows) const;
  // Elements of the `merge` token rows that make one vector of every head.
  size_t MergedRowsElems() const;

  ModelShape shape_;
  Knobs knobs_;
  uint32_t kept_;
  uint32_t vectors_per_block_;
  std::vector<Layer> layers_;
};

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_REPRESENTATION_H_
