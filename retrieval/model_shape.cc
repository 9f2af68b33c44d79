#include "retrieval/model_shape.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace kvstar::retrieval {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
    case DType::kFp16:
      return 2;
    case DType::kFp32:
      return 4;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return "bf16";
    case DType::kFp16:
      return "fp16";
    case DType::kFp32:
      return "fp32";
  }
  return "unknown";
}

const char* RepresentationFormatName(RepresentationFormat format) {
  switch (format) {
    case RepresentationFormat::kBf16:
      return "bf16";
    case RepresentationFormat::kInt8:
      return "int8";
  }
  return "unknown";
}

uint32_t Knobs::kept_channels(const ModelShape& shape) const {
  const long rounded = std::lround(static_cast<double>(shape.head_dim) * blk_repre_dim_prune_ratio);
  return rounded < 1 ? 1u : static_cast<uint32_t>(rounded);
}

namespace {

template <typename T>
absl::Status Bad(absl::string_view field, const T& value, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(field, " = ", value, ": ", why));
}

bool InUnitInterval(float ratio) { return ratio > 0.0f && ratio <= 1.0f; }

}  // namespace

absl::Status ValidateShapeAndKnobs(const ModelShape& shape, const Knobs& knobs) {
  if (shape.num_layers == 0) return Bad("num_layers", 0, "must be positive");
  if (shape.num_q_heads == 0) return Bad("num_q_heads", 0, "must be positive");
  if (shape.num_kv_heads == 0) return Bad("num_kv_heads", 0, "must be positive");
  if (shape.head_dim == 0) return Bad("head_dim", 0, "must be positive");
  if (shape.block_size == 0) return Bad("block_size", 0, "must be positive");
  if (shape.dtype != DType::kBf16 && shape.dtype != DType::kFp16 && shape.dtype != DType::kFp32) {
    return Bad("dtype", static_cast<int>(shape.dtype), "must be bf16, fp16 or fp32");
  }
  if (shape.num_q_heads % shape.num_kv_heads != 0) {
    return Bad("num_q_heads", shape.num_q_heads,
               absl::StrCat("must be a multiple of num_kv_heads (", shape.num_kv_heads, ")"));
  }
  if (knobs.retrieval_stride == 0) return Bad("retrieval_stride", 0, "must be positive");
  if (knobs.blk_repre_inner_token_merge == 0) {
    return Bad("blk_repre_inner_token_merge", 0, "must be positive");
  }
  if (shape.block_size % knobs.blk_repre_inner_token_merge != 0) {
    return Bad("blk_repre_inner_token_merge", knobs.blk_repre_inner_token_merge,
               absl::StrCat("must divide block_size (", shape.block_size, ")"));
  }
  if (!InUnitInterval(knobs.sparse_ratio)) {
    return Bad("sparse_ratio", knobs.sparse_ratio, "must be in (0, 1]");
  }
  if (!InUnitInterval(knobs.blk_repre_dim_prune_ratio)) {
    return Bad("blk_repre_dim_prune_ratio", knobs.blk_repre_dim_prune_ratio, "must be in (0, 1]");
  }
  if (std::lround(static_cast<double>(shape.head_dim) * knobs.blk_repre_dim_prune_ratio) < 1) {
    return Bad("blk_repre_dim_prune_ratio", knobs.blk_repre_dim_prune_ratio,
               absl::StrCat("keeps 0 of head_dim (", shape.head_dim, ") channels"));
  }
  if (knobs.representation_format != RepresentationFormat::kBf16 &&
      knobs.representation_format != RepresentationFormat::kInt8) {
    return Bad("representation_format", static_cast<uint32_t>(knobs.representation_format),
               "must be bf16 (0) or int8 (1)");
  }
  return absl::OkStatus();
}

}  // namespace kvstar::retrieval
