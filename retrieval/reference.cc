#include "retrieval/reference.h"

#include <algorithm>
#include <cmath>

#include "retrieval/convert.h"
#include "retrieval/quantize.h"

namespace kvstar::retrieval {
namespace {

// Element (token, head, channel) of a K block.
float KeyAt(const ModelShape& shape, absl::Span<const uint8_t> block, size_t token, size_t head,
            size_t channel) {
  return LoadAsF32(shape.dtype, block.data(),
                   (token * shape.num_kv_heads + head) * shape.head_dim + channel);
}

}  // namespace

std::vector<uint32_t> ReferenceKeptChannels(
    const ModelShape& shape, const Knobs& knobs,
    absl::Span<const absl::Span<const uint8_t>> key_blocks) {
  const uint32_t kept = knobs.kept_channels(shape);
  std::vector<uint32_t> result;
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    std::vector<float> mass(shape.head_dim, 0.0f);
    for (absl::Span<const uint8_t> block : key_blocks) {
      for (uint32_t t = 0; t < shape.block_size; ++t) {
        for (uint32_t c = 0; c < shape.head_dim; ++c)
          mass[c] += std::fabs(KeyAt(shape, block, t, h, c));
      }
    }
    std::vector<uint32_t> ids(shape.head_dim);
    for (uint32_t c = 0; c < shape.head_dim; ++c) ids[c] = c;
    std::sort(ids.begin(), ids.end(), [&](uint32_t a, uint32_t b) {
      return mass[a] != mass[b] ? mass[a] > mass[b] : a < b;
    });
    ids.resize(kept);
    std::sort(ids.begin(), ids.end());
    result.insert(result.end(), ids.begin(), ids.end());
  }
  return result;
}

std::vector<float> ReferenceRepresentation(const ModelShape& shape, const Knobs& knobs,
                                           absl::Span<const absl::Span<const uint8_t>> key_blocks,
                                           absl::Span<const uint32_t> kept_channels) {
  const uint32_t kept = knobs.kept_channels(shape);
  const uint32_t merge = knobs.blk_repre_inner_token_merge;
  std::vector<float> result;
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    for (absl::Span<const uint8_t> block : key_blocks) {
      for (uint32_t m = 0; m < shape.block_size / merge; ++m) {
        std::vector<float> means(kept);
        for (uint32_t j = 0; j < kept; ++j) {
          float mean = 0.0f;
          for (uint32_t t = 0; t < merge; ++t) {
            mean += KeyAt(shape, block, size_t{m} * merge + t, h, kept_channels[h * kept + j]);
          }
          means[j] = mean / static_cast<float>(merge);
        }
        if (knobs.representation_format == RepresentationFormat::kInt8) {
          std::vector<int8_t> codes(kept);
          const float scale = QuantizeSymmetricInt8(means.data(), kept, codes.data());
          for (uint32_t j = 0; j < kept; ++j)
            result.push_back(static_cast<float>(codes[j]) * scale);
        } else {
          for (uint32_t j = 0; j < kept; ++j) result.push_back(Bf16ToF32(F32ToBf16(means[j])));
        }
      }
    }
  }
  return result;
}

std::vector<float> ReferenceScores(const ModelShape& shape, const Knobs& knobs,
                                   absl::Span<const float> representation,
                                   absl::Span<const uint32_t> kept_channels, uint32_t num_blocks,
                                   absl::Span<const uint8_t> queries, uint32_t num_queries) {
  const uint32_t kept = knobs.kept_channels(shape);
  const uint32_t vectors = knobs.vectors_per_block(shape);
  const uint32_t group = shape.num_q_heads / shape.num_kv_heads;
  const size_t columns = size_t{num_blocks} * vectors;
  std::vector<float> block_scores(num_blocks, 0.0f);
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    const float* rep = representation.data() + h * columns * kept;
    const uint32_t* channels = kept_channels.data() + h * kept;
    // Materialised score matrix of this head: [num_queries * group][columns].
    std::vector<double> scores(size_t{num_queries} * group * columns);
    for (uint32_t s = 0; s < num_queries; ++s) {
      for (uint32_t g = 0; g < group; ++g) {
        const size_t q_base = (size_t{s} * shape.num_q_heads + h * group + g) * shape.head_dim;
        double* row = &scores[(size_t{s} * group + g) * columns];
        // The query row on the kept channels; int8 representations score it quantized.
        std::vector<double> query(kept);
        std::vector<float> values(kept);
        for (uint32_t j = 0; j < kept; ++j) {
          values[j] = LoadAsF32(shape.dtype, queries.data(), q_base + channels[j]);
          query[j] = values[j];
        }
        if (knobs.representation_format == RepresentationFormat::kInt8) {
          std::vector<int8_t> high(kept), low(kept);
          const float scale = QuantizeQueryInt8(values.data(), kept, high.data(), low.data());
          for (uint32_t j = 0; j < kept; ++j) query[j] = QueryCodeValue(high[j], low[j]) * scale;
        }
        for (size_t col = 0; col < columns; ++col) {
          double dot = 0.0;
          for (uint32_t j = 0; j < kept; ++j) dot += query[j] * rep[col * kept + j];
          row[col] = dot / std::sqrt(static_cast<double>(shape.head_dim));
        }
      }
    }
    std::vector<double> head_scores(num_blocks, 0.0);
    for (size_t row = 0; row < size_t{num_queries} * group; ++row) {
      double* r = &scores[row * columns];
      const double max = *std::max_element(r, r + columns);
      double sum = 0.0;
      for (size_t col = 0; col < columns; ++col) sum += (r[col] = std::exp(r[col] - max));
      std::vector<double> row_shares(num_blocks, 0.0);
      for (size_t col = 0; col < columns; ++col) row_shares[col / vectors] += r[col] / sum;
      for (uint32_t b = 0; b < num_blocks; ++b) {
        head_scores[b] = knobs.block_vote == BlockVote::kMax
                             ? std::max(head_scores[b], row_shares[b])
                             : head_scores[b] + row_shares[b];
      }
    }
    for (uint32_t b = 0; b < num_blocks; ++b) block_scores[b] += static_cast<float>(head_scores[b]);
  }
  return block_scores;
}

std::vector<uint32_t> ReferenceSelect(absl::Span<const float> block_scores, const Knobs& knobs) {
  const uint32_t n = static_cast<uint32_t>(block_scores.size());
  std::vector<uint32_t> selected;
  const uint32_t init = knobs.init_window_sz, local = knobs.local_window_sz;
  if (n <= init + local) {
    for (uint32_t b = 0; b < n; ++b) selected.push_back(b);
    return selected;
  }
  std::vector<uint32_t> middle;
  for (uint32_t b = init; b < n - local; ++b) middle.push_back(b);
  std::stable_sort(middle.begin(), middle.end(),
                   [&](uint32_t a, uint32_t b) { return block_scores[a] > block_scores[b]; });
  const auto k =
      static_cast<size_t>(std::ceil(middle.size() * static_cast<double>(knobs.sparse_ratio)));
  middle.resize(std::min(k, middle.size()));
  for (uint32_t b = 0; b < init; ++b) selected.push_back(b);
  for (uint32_t b = n - local; b < n; ++b) selected.push_back(b);
  selected.insert(selected.end(), middle.begin(), middle.end());
  std::sort(selected.begin(), selected.end());
  return selected;
}

std::vector<uint32_t> ReferenceRetrieveLayer(const ModelShape& shape, const Knobs& knobs,
                                             absl::Span<const absl::Span<const uint8_t>> key_blocks,
                                             absl::Span<const uint8_t> queries,
                                             uint32_t num_queries) {
  const std::vector<uint32_t> channels = ReferenceKeptChannels(shape, knobs, key_blocks);
  const std::vector<float> rep = ReferenceRepresentation(shape, knobs, key_blocks, channels);
  const std::vector<float> scores = ReferenceScores(
      shape, knobs, rep, channels, static_cast<uint32_t>(key_blocks.size()), queries, num_queries);
  return ReferenceSelect(scores, knobs);
}

}  // namespace kvstar::retrieval
