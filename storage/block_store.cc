#include "storage/block_store.h"

#include <utility>

namespace kvstar::storage {

absl::Status BlockStore::ReadBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                    std::vector<SharedBlockData>* out) {
  std::vector<BlockData> read;
  if (absl::Status status = GetBlocks(sequence_key, ids, &read); !status.ok()) return status;
  out->clear();
  out->reserve(read.size());
  for (BlockData& block : read) out->push_back(std::make_shared<const BlockData>(std::move(block)));
  return absl::OkStatus();
}

}  // namespace kvstar::storage
