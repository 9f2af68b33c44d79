// Block selection: init and local windows plus the top-k middle blocks by score.
#ifndef KVSTAR_RETRIEVAL_TOPK_H_
#define KVSTAR_RETRIEVAL_TOPK_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "retrieval/model_shape.h"

namespace kvstar::retrieval {

// k = ceil(n_middle * sparse_ratio) for n_middle = num_blocks - init - local middle blocks;
// 0 when the windows cover every block.
uint32_t NumSelectedMiddle(uint32_t num_blocks, const Knobs& knobs);

// Returns the selected block ids, ascending: the first init_window_sz and last local_window_sz
// blocks always, plus the k middle blocks with the highest scores (equal scores: the lower
// block id wins). With no more blocks than the windows hold, every block. Thread-safe.
std::vector<uint32_t> SelectBlocks(absl::Span<const float> block_scores, const Knobs& knobs);

// Reusable working memory of SelectBlocksInto. Not thread-safe.
struct SelectScratch {
  std::vector<uint32_t> middle;
};

// As SelectBlocks, into `selected` (replaced), allocating only when a buffer must grow.
void SelectBlocksInto(absl::Span<const float> block_scores, const Knobs& knobs,
                      SelectScratch& scratch, std::vector<uint32_t>& selected);

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_TOPK_H_
