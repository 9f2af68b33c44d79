#include "storage/store_util.h"

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "spdlog/spdlog.h"

namespace kvstar::storage {

std::string DescribeSequence(absl::string_view sequence_key) {
  return absl::StrCat("sequence \"", absl::CHexEscape(sequence_key), "\"");
}

std::string DescribeBlock(absl::string_view sequence_key, BlockId id) {
  return absl::StrCat("block (layer ", id.layer, ", index ", id.block_index, ") of ",
                      DescribeSequence(sequence_key));
}

absl::Status SequenceNotFound(absl::string_view sequence_key) {
  return absl::NotFoundError(absl::StrCat("no ", DescribeSequence(sequence_key)));
}

absl::Status BlockNotFound(absl::string_view sequence_key, BlockId id) {
  return absl::NotFoundError(absl::StrCat("no ", DescribeBlock(sequence_key, id)));
}

absl::Status ValidateBlockWrites(absl::string_view sequence_key,
                                 absl::Span<const BlockWrite> blocks) {
  absl::flat_hash_set<BlockId> seen;
  seen.reserve(blocks.size());
  for (const BlockWrite& block : blocks) {
    if (!seen.insert(block.id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(DescribeBlock(sequence_key, block.id), " appears twice in one batch"));
    }
    const uint64_t actual = BlockChecksum(block.key, block.value);
    if (actual != block.checksum) {
      return absl::InvalidArgumentError(
          absl::StrCat("checksum mismatch for ", DescribeBlock(sequence_key, block.id), ": given ",
                       absl::Hex(block.checksum, absl::kZeroPad16), ", bytes hash to ",
                       absl::Hex(actual, absl::kZeroPad16)));
    }
  }
  return absl::OkStatus();
}

absl::Status VerifyStoredBlock(absl::string_view sequence_key, BlockId id, absl::string_view key,
                               absl::string_view value, uint64_t checksum) {
  const uint64_t actual = BlockChecksum(key, value);
  if (actual == checksum) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat("stored ", DescribeBlock(sequence_key, id),
                                          " is corrupt: checksum recorded ",
                                          absl::Hex(checksum, absl::kZeroPad16), ", bytes hash to ",
                                          absl::Hex(actual, absl::kZeroPad16)));
}

void ReportCorruptBlock(absl::string_view tier, absl::string_view sequence_key, BlockId id,
                        const absl::Status& status, std::atomic<uint64_t>* corrupt_blocks) {
  corrupt_blocks->fetch_add(1, std::memory_order_relaxed);
  spdlog::error("event=corrupt_block tier={} sequence={} layer={} block={} message={}",
                LogValue(tier), LogValue(sequence_key), id.layer, id.block_index,
                LogValue(status.message()));
}

void AppendBigEndian32(uint32_t v, std::string* out) {
  const char bytes[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
                         static_cast<char>(v >> 8), static_cast<char>(v)};
  out->append(bytes, 4);
}

uint32_t ReadBigEndian32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | u[3];
}

void AppendLittleEndian32(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

void AppendLittleEndian64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

uint32_t ReadLittleEndian32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | u[i];
  return v;
}

uint64_t ReadLittleEndian64(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | u[i];
  return v;
}

absl::Mutex& SequenceLockTable::For(absl::string_view sequence_key) {
  return stripes_[absl::Hash<absl::string_view>()(sequence_key) % kStripes];
}

absl::Status CopySharedBlocks(BlockStore& store, absl::string_view sequence_key,
                              absl::Span<const BlockId> ids, std::vector<BlockData>* out) {
  std::vector<SharedBlockData> shared;
  if (absl::Status status = store.ReadBlocks(sequence_key, ids, &shared); !status.ok()) {
    return status;
  }
  out->resize(shared.size());
  for (size_t i = 0; i < shared.size(); ++i) (*out)[i] = *shared[i];
  return absl::OkStatus();
}

}  // namespace kvstar::storage
