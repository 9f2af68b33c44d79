#include "retrieval/topk.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvstar::retrieval {

uint32_t NumSelectedMiddle(uint32_t num_blocks, const Knobs& knobs) {
  const uint64_t windows = uint64_t{knobs.init_window_sz} + knobs.local_window_sz;
  if (num_blocks <= windows) return 0;
  const uint32_t middle = num_blocks - static_cast<uint32_t>(windows);
  const double k = std::ceil(static_cast<double>(middle) * static_cast<double>(knobs.sparse_ratio));
  return std::min(middle, static_cast<uint32_t>(k));
}

std::vector<uint32_t> SelectBlocks(absl::Span<const float> block_scores, const Knobs& knobs) {
  SelectScratch scratch;
  std::vector<uint32_t> selected;
  SelectBlocksInto(block_scores, knobs, scratch, selected);
  return selected;
}

void SelectBlocksInto(absl::Span<const float> block_scores, const Knobs& knobs,
                      SelectScratch& scratch, std::vector<uint32_t>& selected) {
  const uint32_t n = static_cast<uint32_t>(block_scores.size());
  selected.clear();
  if (n <= uint64_t{knobs.init_window_sz} + knobs.local_window_sz) {
    selected.resize(n);
    std::iota(selected.begin(), selected.end(), 0u);
    return;
  }
  const uint32_t init = knobs.init_window_sz;
  const uint32_t local_begin = n - knobs.local_window_sz;
  const uint32_t k = NumSelectedMiddle(n, knobs);
  std::vector<uint32_t>& middle = scratch.middle;
  middle.resize(local_begin - init);
  std::iota(middle.begin(), middle.end(), init);
  // Total order: higher score first, then lower id; NaN ranks last.
  auto better = [&](uint32_t a, uint32_t b) {
    const float sa = block_scores[a], sb = block_scores[b];
    const bool a_nan = std::isnan(sa), b_nan = std::isnan(sb);
    if (a_nan != b_nan) return b_nan;
    if (!a_nan && sa != sb) return sa > sb;
    return a < b;
  };
  std::nth_element(middle.begin(), middle.begin() + k, middle.end(), better);
  selected.reserve(init + k + knobs.local_window_sz);
  for (uint32_t b = 0; b < init; ++b) selected.push_back(b);
  selected.insert(selected.end(), middle.begin(), middle.begin() + k);
  for (uint32_t b = local_begin; b < n; ++b) selected.push_back(b);
  std::sort(selected.begin() + init, selected.begin() + init + k);
}

}  // namespace kvstar::retrieval
