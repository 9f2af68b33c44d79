#include "retrieval/representation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "retrieval/convert.h"
#include "retrieval/quantize.h"

namespace kvstar::retrieval {

absl::StatusOr<std::unique_ptr<SequenceIndex>> SequenceIndex::Create(const ModelShape& shape,
                                                                     const Knobs& knobs) {
  if (absl::Status status = ValidateShapeAndKnobs(shape, knobs); !status.ok()) return status;
  return std::unique_ptr<SequenceIndex>(new SequenceIndex(shape, knobs));
}

SequenceIndex::SequenceIndex(const ModelShape& shape, const Knobs& knobs)
    : shape_(shape),
      knobs_(knobs),
      kept_(knobs.kept_channels(shape)),
      vectors_per_block_(knobs.vectors_per_block(shape)),
      layers_(shape.num_layers) {}

absl::Status SequenceIndex::CheckBlocks(
    uint32_t layer, absl::Span<const absl::Span<const uint8_t>> key_blocks) const {
  if (layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer = ", layer, ": must be below num_layers (", shape_.num_layers, ")"));
  }
  for (size_t b = 0; b < key_blocks.size(); ++b) {
    if (key_blocks[b].size() != shape_.key_block_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat("key block ", b, " of layer ", layer, " has ",
                                                     key_blocks[b].size(), " bytes, expected ",
                                                     shape_.key_block_bytes()));
    }
  }
  return absl::OkStatus();
}

absl::Status SequenceIndex::SealLayer(uint32_t layer,
                                      absl::Span<const absl::Span<const uint8_t>> key_blocks) {
  if (absl::Status status = CheckBlocks(layer, key_blocks); !status.ok()) return status;
  const uint32_t heads = shape_.num_kv_heads;
  const uint32_t dim = shape_.head_dim;
  // Sum of |K| per (head, channel) over every sealed token, in token order.
  std::vector<float> abs_sum(size_t{heads} * dim, 0.0f);
  for (absl::Span<const uint8_t> block : key_blocks) {
    const size_t row_elems = size_t{heads} * dim;
    const size_t row_bytes = row_elems * DTypeSize(shape_.dtype);
    for (uint32_t token = 0; token < shape_.block_size; ++token) {
      AddAbsF32(shape_.dtype, block.data() + token * row_bytes, row_elems, abs_sum.data());
    }
  }
  std::vector<uint32_t> kept_channels;
  kept_channels.reserve(size_t{heads} * kept_);
  std::vector<uint32_t> order(dim);
  for (uint32_t h = 0; h < heads; ++h) {
    const float* sums = &abs_sum[size_t{h} * dim];
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(),
                     [sums](uint32_t a, uint32_t b) { return sums[a] > sums[b]; });
    kept_channels.insert(kept_channels.end(), order.begin(), order.begin() + kept_);
  }
  return SealLayerWithChannels(layer, key_blocks, kept_channels);
}

absl::Status SequenceIndex::SealLayerWithChannels(
    uint32_t layer, absl::Span<const absl::Span<const uint8_t>> key_blocks,
    absl::Span<const uint32_t> kept_channels) {
  if (absl::Status status = CheckBlocks(layer, key_blocks); !status.ok()) return status;
  const uint32_t heads = shape_.num_kv_heads;
  if (kept_channels.size() != size_t{heads} * kept_) {
    return absl::InvalidArgumentError(absl::StrCat("kept_channels has ", kept_channels.size(),
                                                   " ids, expected ", size_t{heads} * kept_));
  }
  Layer fresh;
  fresh.sealed = true;
  fresh.kept_channels.assign(kept_channels.begin(), kept_channels.end());
  for (uint32_t h = 0; h < heads; ++h) {
    auto first = fresh.kept_channels.begin() + size_t{h} * kept_;
    std::sort(first, first + kept_);
    if (std::adjacent_find(first, first + kept_) != first + kept_ ||
        *(first + kept_ - 1) >= shape_.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("kept_channels of KV head ", h,
                                                     ": ids must be distinct and below head_dim (",
                                                     shape_.head_dim, ")"));
    }
  }
  fresh.vectors.resize(heads);
  fresh.norms.resize(heads);
  const size_t groups = (key_blocks.size() + kBlocksPerGroup - 1) / kBlocksPerGroup;
  if (format() == RepresentationFormat::kInt8) {
    fresh.codes.resize(heads);
    fresh.scales.resize(heads);
    for (auto& head_codes : fresh.codes) head_codes.reserve(groups * codes_per_group());
  } else {
    for (auto& head_vectors : fresh.vectors) head_vectors.reserve(groups * values_per_group());
  }
  std::vector<float> merged_rows(MergedRowsElems());
  for (absl::Span<const uint8_t> block : key_blocks)
    AppendVectors(fresh, block, merged_rows.data());
  layers_[layer] = std::move(fresh);
  return absl::OkStatus();
}

absl::Status SequenceIndex::AppendBlock(uint32_t layer, absl::Span<const uint8_t> key_block) {
  if (absl::Status status = CheckBlocks(layer, {key_block}); !status.ok()) return status;
  if (!layers_[layer].sealed) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " must be sealed before AppendBlock"));
  }
  std::vector<float> merged_rows(MergedRowsElems());
  AppendVectors(layers_[layer], key_block, merged_rows.data());
  return absl::OkStatus();
}

size_t SequenceIndex::MergedRowsElems() const {
  return size_t{knobs_.blk_repre_inner_token_merge} * shape_.num_kv_heads * shape_.head_dim;
}

void SequenceIndex::AppendVectors(Layer& layer, absl::Span<const uint8_t> key_block,
                                  float* merged_rows) const {
  const uint32_t heads = shape_.num_kv_heads;
  const uint32_t dim = shape_.head_dim;
  const uint32_t merge = knobs_.blk_repre_inner_token_merge;
  const uint32_t block = layer.num_blocks;
  // A new group starts zeroed: its other blocks and the odd channel's partner stay zero.
  const bool int8 = format() == RepresentationFormat::kInt8;
  if (block % kBlocksPerGroup == 0) {
    for (uint32_t h = 0; h < heads; ++h) {
      if (int8) {
        layer.codes[h].resize(layer.codes[h].size() + codes_per_group(), kInt8CodeOffset);
        layer.scales[h].resize(
            layer.scales[h].size() + size_t{kBlocksPerGroup} * vectors_per_block_, 0.0f);
      } else {
        layer.vectors[h].resize(layer.vectors[h].size() + values_per_group(), 0);
      }
      layer.norms[h].push_back(0.0f);
    }
  }
  std::vector<float> means(kept_);
  std::vector<int8_t> codes(kept_);
  const size_t rows_bytes = MergedRowsElems() * DTypeSize(shape_.dtype);
  for (uint32_t m = 0; m < vectors_per_block_; ++m) {
    // Widen only the `merge` token rows of this vector, so the copy stays in L1.
    ConvertToF32(shape_.dtype, key_block.data() + m * rows_bytes, MergedRowsElems(), merged_rows);
    for (uint32_t h = 0; h < heads; ++h) {
      const uint32_t* channels = &layer.kept_channels[size_t{h} * kept_];
      double squares = 0.0;
      for (uint32_t j = 0; j < kept_; ++j) {
        float sum = 0.0f;
        for (uint32_t t = 0; t < merge; ++t)
          sum += merged_rows[(size_t{t} * heads + h) * dim + channels[j]];
        means[j] = sum / static_cast<float>(merge);
      }
      if (int8) {
        const float scale = QuantizeSymmetricInt8(means.data(), kept_, codes.data());
        layer.scales[h][scale_offset(block, m)] = scale;
        for (uint32_t j = 0; j < kept_; ++j) {
          layer.codes[h][code_offset(block, m, j)] =
              static_cast<uint8_t>(codes[j] + int{kInt8CodeOffset});
          const double value = static_cast<double>(codes[j]) * scale;
          squares += value * value;
        }
      } else {
        std::vector<uint16_t>& out = layer.vectors[h];
        for (uint32_t j = 0; j < kept_; ++j) {
          const uint16_t value = F32ToBf16(means[j]);
          out[representation_offset(block, m, j)] = value;
          squares += double{Bf16ToF32(value)} * Bf16ToF32(value);
        }
      }
      // Rounded up so that it stays an upper bound after the conversion to float.
      float& group_norm = layer.norms[h].back();
      group_norm =
          std::max(group_norm, std::nextafter(static_cast<float>(std::sqrt(squares)), HUGE_VALF));
    }
  }
  ++layer.num_blocks;
}

absl::Span<const uint32_t> SequenceIndex::kept_channels(uint32_t layer, uint32_t kv_head) const {
  if (!layers_[layer].sealed) return {};
  return absl::MakeConstSpan(layers_[layer].kept_channels).subspan(size_t{kv_head} * kept_, kept_);
}

absl::Span<const uint16_t> SequenceIndex::representation(uint32_t layer, uint32_t kv_head) const {
  const Layer& l = layers_[layer];
  if (!l.sealed) return {};
  return absl::MakeConstSpan(l.vectors[kv_head]);
}

absl::Span<const uint8_t> SequenceIndex::codes(uint32_t layer, uint32_t kv_head) const {
  const Layer& l = layers_[layer];
  if (!l.sealed || l.codes.empty()) return {};
  return absl::MakeConstSpan(l.codes[kv_head]);
}

absl::Span<const float> SequenceIndex::code_scales(uint32_t layer, uint32_t kv_head) const {
  const Layer& l = layers_[layer];
  if (!l.sealed || l.scales.empty()) return {};
  return absl::MakeConstSpan(l.scales[kv_head]);
}

std::vector<uint16_t> SequenceIndex::RowMajorRepresentation(uint32_t layer,
                                                            uint32_t kv_head) const {
  std::vector<uint16_t> rows;
  if (format() == RepresentationFormat::kInt8) {
    const absl::Span<const uint8_t> stored = codes(layer, kv_head);
    const absl::Span<const float> scales = code_scales(layer, kv_head);
    if (stored.empty()) return {};
    rows.reserve(size_t{num_blocks(layer)} * vectors_per_block_ * kept_);
    for (uint32_t b = 0; b < num_blocks(layer); ++b) {
      for (uint32_t m = 0; m < vectors_per_block_; ++m) {
        for (uint32_t j = 0; j < kept_; ++j) {
          const int code = int{stored[code_offset(b, m, j)]} - int{kInt8CodeOffset};
          rows.push_back(F32ToBf16(static_cast<float>(code) * scales[scale_offset(b, m)]));
        }
      }
    }
    return rows;
  }
  const absl::Span<const uint16_t> stored = representation(layer, kv_head);
  if (stored.empty()) return {};
  rows.reserve(size_t{num_blocks(layer)} * vectors_per_block_ * kept_);
  for (uint32_t b = 0; b < num_blocks(layer); ++b) {
    for (uint32_t m = 0; m < vectors_per_block_; ++m) {
      for (uint32_t j = 0; j < kept_; ++j) rows.push_back(stored[representation_offset(b, m, j)]);
    }
  }
  return rows;
}

absl::Span<const float> SequenceIndex::group_norms(uint32_t layer, uint32_t kv_head) const {
  const Layer& l = layers_[layer];
  if (!l.sealed) return {};
  return absl::MakeConstSpan(l.norms[kv_head]);
}

size_t SequenceIndex::representation_bytes() const {
  size_t bytes = 0;
  for (const Layer& l : layers_) {
    for (const auto& head_vectors : l.vectors) bytes += head_vectors.size() * sizeof(uint16_t);
    for (const auto& head_codes : l.codes) bytes += head_codes.size();
    for (const auto& head_scales : l.scales) bytes += head_scales.size() * sizeof(float);
  }
  return bytes;
}

}  // namespace kvstar::retrieval
