#include "server/validation.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvstar::server {
namespace {

absl::Status OutOfRange(absl::string_view field, uint64_t value, uint64_t lo, uint64_t hi) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, " is ", value, ", must be in [", lo, ", ", hi, "]"));
}

absl::Status CheckRange(absl::string_view field, uint64_t value, uint64_t lo, uint64_t hi) {
  if (value < lo || value > hi) return OutOfRange(field, value, lo, hi);
  return absl::OkStatus();
}

// Length of the UTF-8 sequence starting at text[i], or 0 when it is not valid UTF-8 (truncated,
// a bad continuation byte, an overlong form, a surrogate or a code point above U+10FFFF).
size_t Utf8SequenceLength(absl::string_view text, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  size_t length = 0;
  uint32_t code_point = 0;
  uint32_t smallest = 0;
  if (lead < 0x80) return 1;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2, code_point = lead & 0x1f, smallest = 0x80;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3, code_point = lead & 0x0f, smallest = 0x800;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4, code_point = lead & 0x07, smallest = 0x10000;
  } else {
    return 0;
  }
  if (i + length > text.size()) return 0;
  for (size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
    code_point = (code_point << 6) | (byte(i + k) & 0x3f);
  }
  if (code_point < smallest || code_point > 0x10ffff) return 0;
  if (code_point >= 0xd800 && code_point <= 0xdfff) return 0;
  return length;
}

}  // namespace

uint32_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_BF16:
    case v1::DTYPE_FP16:
      return 2;
    case v1::DTYPE_FP32:
      return 4;
    default:
      return 0;
  }
}

uint64_t BlockKeyBytes(const v1::ModelProfile& profile) {
  return uint64_t{profile.block_size()} * profile.num_kv_heads() * profile.head_dim() *
         DTypeBytes(profile.dtype());
}

uint64_t QueryRowBytes(const v1::ModelProfile& profile) {
  return uint64_t{profile.num_q_heads()} * profile.head_dim() * DTypeBytes(profile.dtype());
}

absl::Status ValidateSequenceId(absl::string_view sequence_id) {
  if (sequence_id.empty()) return absl::InvalidArgumentError("sequence_id is empty");
  if (sequence_id.size() > kMaxSequenceIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("sequence_id is ", sequence_id.size(),
                                                   " bytes, at most ", kMaxSequenceIdBytes,
                                                   " allowed"));
  }
  for (size_t i = 0; i < sequence_id.size();) {
    const auto byte = static_cast<unsigned char>(sequence_id[i]);
    if (byte < 0x20 || byte == 0x7f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "sequence_id \"%s\" holds control character 0x%02x at byte %d; ids are printable UTF-8",
          absl::CHexEscape(sequence_id), byte, i));
    }
    const size_t length = Utf8SequenceLength(sequence_id, i);
    if (length == 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("sequence_id \"%s\" is not valid UTF-8 (byte 0x%02x at byte %d)",
                          absl::CHexEscape(sequence_id), byte, i));
    }
    i += length;
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelProfile> NormalizeProfile(const v1::ModelProfile& profile) {
  v1::ModelProfile out = profile;
  if (out.block_size() == 0) out.set_block_size(kDefaultBlockSize);
  if (auto s = CheckRange("profile.num_layers", out.num_layers(), 1, kMaxLayers); !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("profile.num_q_heads", out.num_q_heads(), 1, kMaxHeads); !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("profile.num_kv_heads", out.num_kv_heads(), 1, out.num_q_heads());
      !s.ok()) {
    return s;
  }
  if (out.num_q_heads() % out.num_kv_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("profile.num_q_heads (", out.num_q_heads(),
                                                   ") is not a multiple of profile.num_kv_heads (",
                                                   out.num_kv_heads(), ")"));
  }
  if (auto s = CheckRange("profile.head_dim", out.head_dim(), 1, kMaxHeadDim); !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("profile.block_size", out.block_size(), 1, kMaxBlockSize); !s.ok()) {
    return s;
  }
  if (DTypeBytes(out.dtype()) == 0) {
    // An unknown value has no name: print the number.
    const std::string dtype = v1::DType_IsValid(out.dtype())
                                  ? v1::DType_Name(out.dtype())
                                  : absl::StrCat(static_cast<int>(out.dtype()), " (unknown)");
    return absl::InvalidArgumentError(
        absl::StrCat("profile.dtype is ", dtype, ", must be DTYPE_BF16, DTYPE_FP16 or DTYPE_FP32"));
  }
  const uint64_t block_bytes = 2 * BlockKeyBytes(out);
  if (block_bytes > kMaxBlockBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile: one block is ", block_bytes, " bytes (K and V of block_size ", out.block_size(),
        " x num_kv_heads ", out.num_kv_heads(), " x head_dim ", out.head_dim(), " x ",
        DTypeBytes(out.dtype()), " bytes each), at most ", kMaxBlockBytes, " allowed"));
  }
  return out;
}

absl::StatusOr<v1::KvstarConfig> NormalizeConfig(const v1::KvstarConfig& config,
                                                 const v1::ModelProfile& profile) {
  v1::KvstarConfig out = config;
  if (!out.has_init_window_sz()) out.set_init_window_sz(1);
  if (!out.has_local_window_sz()) out.set_local_window_sz(2);
  if (!out.has_sparse_ratio()) out.set_sparse_ratio(0.25f);
  if (!out.has_retrieval_stride()) out.set_retrieval_stride(8);
  if (!out.has_blk_repre_dim_prune_ratio()) out.set_blk_repre_dim_prune_ratio(0.25f);
  if (!out.has_blk_repre_inner_token_merge()) out.set_blk_repre_inner_token_merge(2);
  if (!out.has_block_vote()) out.set_block_vote(v1::BLOCK_VOTE_SUM);
  if (!v1::BlockVote_IsValid(out.block_vote())) {
    return absl::InvalidArgumentError(absl::StrCat("config.block_vote is ", out.block_vote(),
                                                   ": must be BLOCK_VOTE_SUM (0) or "
                                                   "BLOCK_VOTE_MAX (1)"));
  }

  if (auto s = CheckRange("config.init_window_sz", out.init_window_sz(), 0, kMaxBlocksPerLayer);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("config.local_window_sz", out.local_window_sz(), 0, kMaxBlocksPerLayer);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckRange("config.retrieval_stride", out.retrieval_stride(), 1, 1024); !s.ok()) {
    return s;
  }
  // Ratios, the merge factor and the kept channels are the retrieval engine's to judge.
  if (auto s = retrieval::ValidateShapeAndKnobs(ToModelShape(profile), ToKnobs(out)); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config.", s.message()));
  }
  return out;
}

retrieval::ModelShape ToModelShape(const v1::ModelProfile& profile) {
  retrieval::ModelShape shape;
  shape.num_layers = profile.num_layers();
  shape.num_q_heads = profile.num_q_heads();
  shape.num_kv_heads = profile.num_kv_heads();
  shape.head_dim = profile.head_dim();
  shape.block_size = profile.block_size();
  switch (profile.dtype()) {
    case v1::DTYPE_FP16:
      shape.dtype = retrieval::DType::kFp16;
      break;
    case v1::DTYPE_FP32:
      shape.dtype = retrieval::DType::kFp32;
      break;
    default:
      shape.dtype = retrieval::DType::kBf16;
      break;
  }
  return shape;
}

retrieval::Knobs ToKnobs(const v1::KvstarConfig& config) {
  retrieval::Knobs knobs;
  knobs.init_window_sz = config.init_window_sz();
  knobs.local_window_sz = config.local_window_sz();
  knobs.sparse_ratio = config.sparse_ratio();
  knobs.retrieval_stride = config.retrieval_stride();
  knobs.blk_repre_dim_prune_ratio = config.blk_repre_dim_prune_ratio();
  knobs.blk_repre_inner_token_merge = config.blk_repre_inner_token_merge();
  knobs.block_vote = config.block_vote() == v1::BLOCK_VOTE_MAX ? retrieval::BlockVote::kMax
                                                               : retrieval::BlockVote::kSum;
  return knobs;
}

absl::Status ValidateLayerQueries(const v1::LayerQueries& queries, const v1::ModelProfile& profile,
                                  uint32_t max_queries, absl::string_view where) {
  if (queries.layer() >= profile.num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".layer is ", queries.layer(),
                                                   ", the sequence has ", profile.num_layers(),
                                                   " layers"));
  }
  if (auto s =
          CheckRange(absl::StrCat(where, ".num_queries"), queries.num_queries(), 1, max_queries);
      !s.ok()) {
    return s;
  }
  const uint64_t expected = queries.num_queries() * QueryRowBytes(profile);
  if (queries.queries().size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ".queries is ", queries.queries().size(), " bytes; ", queries.num_queries(),
        " queries x num_q_heads ", profile.num_q_heads(), " x head_dim ", profile.head_dim(), " x ",
        DTypeBytes(profile.dtype()), " bytes need ", expected));
  }
  return absl::OkStatus();
}

absl::Status ValidateBlockRef(uint32_t layer, uint32_t block_index, const v1::ModelProfile& profile,
                              absl::string_view where) {
  if (layer >= profile.num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ".layer is ", layer, ", the sequence has ", profile.num_layers(), " layers"));
  }
  if (block_index >= kMaxBlocksPerLayer) {
    return OutOfRange(absl::StrCat(where, ".block_index"), block_index, 0, kMaxBlocksPerLayer - 1);
  }
  return absl::OkStatus();
}

absl::Status ValidateBlock(const v1::Block& block, const v1::ModelProfile& profile,
                           absl::string_view where) {
  if (auto s = ValidateBlockRef(block.layer(), block.block_index(), profile, where); !s.ok()) {
    return s;
  }
  if (block.has_shared()) {
    return absl::UnimplementedError(
        absl::StrCat(where, ".shared: shared-memory blocks are not accepted by PutBlocks yet"));
  }
  const uint64_t expected = BlockKeyBytes(profile);
  if (block.key().size() != expected || block.value().size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " (layer ", block.layer(), ", block ", block.block_index(), "): key is ",
        block.key().size(), " bytes and value ", block.value().size(), " bytes; the profile needs ",
        expected, " each (block_size ", profile.block_size(), " x num_kv_heads ",
        profile.num_kv_heads(), " x head_dim ", profile.head_dim(), " x ",
        DTypeBytes(profile.dtype()), " bytes)"));
  }
  return absl::OkStatus();
}

}  // namespace kvstar::server
