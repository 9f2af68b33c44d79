// libFuzzer target over request validation (server/validation.h): the first byte picks a request
// type and the profile of the sequence it is checked against, the rest is parsed as that
// protobuf message, and every validation function the storage node runs on it runs on it here,
// the way server/storage_node.cc calls them. A crash, a sanitizer report or a broken invariant
// (a normalized profile or config that does not validate again) is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvstar/v1/kvstar.pb.h"
#include "server/validation.h"

namespace kvstar::server {
namespace {

// Normalized profiles of existing sequences: small, fp32 with grouped heads, and the largest
// block the limits allow.
v1::ModelProfile StoredProfile(int variant) {
  v1::ModelProfile profile;
  switch (variant % 3) {
    case 0:
      profile.set_num_layers(2), profile.set_num_q_heads(4), profile.set_num_kv_heads(2);
      profile.set_head_dim(8), profile.set_block_size(16), profile.set_dtype(v1::DTYPE_BF16);
      break;
    case 1:
      profile.set_num_layers(3), profile.set_num_q_heads(6), profile.set_num_kv_heads(3);
      profile.set_head_dim(4), profile.set_block_size(2), profile.set_dtype(v1::DTYPE_FP32);
      break;
    default:
      profile.set_num_layers(kMaxLayers), profile.set_num_q_heads(kMaxHeads);
      profile.set_num_kv_heads(1), profile.set_head_dim(kMaxHeadDim);
      profile.set_block_size(kMaxBlockSize / 256), profile.set_dtype(v1::DTYPE_FP16);
      break;
  }
  return profile;
}

void Require(bool condition, const char* what) {
  if (!condition) {
    fprintf(stderr, "validation_fuzzer: invariant broken: %s\n", what);
    abort();
  }
}

void CheckCreate(const v1::CreateSequenceRequest& request) {
  (void)ValidateSequenceId(request.sequence_id());
  absl::StatusOr<v1::ModelProfile> profile = NormalizeProfile(request.profile());
  if (!profile.ok()) return;
  Require(NormalizeProfile(*profile).ok(), "a normalized profile normalizes again");
  Require(BlockKeyBytes(*profile) * 2 <= kMaxBlockBytes, "a normalized block fits the limit");
  (void)QueryRowBytes(*profile);
  absl::StatusOr<v1::KvstarConfig> config = NormalizeConfig(request.config(), *profile);
  if (!config.ok()) return;
  Require(NormalizeConfig(*config, *profile).ok(), "a normalized config normalizes again");
  (void)ToModelShape(*profile);
  (void)ToKnobs(*config);
}

void CheckPut(const v1::PutBlocksRequest& request, const v1::ModelProfile& profile) {
  (void)ValidateSequenceId(request.sequence_id());
  for (int i = 0; i < request.blocks_size(); ++i) {
    (void)ValidateBlock(request.blocks(i), profile, absl::StrCat("blocks[", i, "]"));
  }
}

void CheckSeal(const v1::SealRequest& request, const v1::ModelProfile& profile) {
  (void)ValidateSequenceId(request.sequence_id());
  for (int i = 0; i < request.queries_size(); ++i) {
    (void)ValidateLayerQueries(request.queries(i), profile, 64, absl::StrCat("queries[", i, "]"));
  }
}

void CheckRetrieve(const v1::RetrieveRequest& request, const v1::ModelProfile& profile) {
  for (int s = 0; s < request.sequences_size(); ++s) {
    const v1::SequenceQueries& part = request.sequences(s);
    const std::string where = absl::StrCat("sequences[", s, "]");
    (void)ValidateSequenceId(part.sequence_id());
    for (int i = 0; i < part.queries_size(); ++i) {
      (void)ValidateLayerQueries(part.queries(i), profile, 8,
                                 absl::StrCat(where, ".queries[", i, "]"));
    }
    for (const v1::HeldBlocks& held : part.held()) {
      for (uint32_t index : held.block_indices()) {
        (void)ValidateBlockRef(held.layer(), index, profile, where);
      }
    }
  }
}

void CheckGet(const v1::GetBlocksRequest& request, const v1::ModelProfile& profile) {
  (void)ValidateSequenceId(request.sequence_id());
  for (const v1::BlockRef& ref : request.blocks()) {
    (void)ValidateBlockRef(ref.layer(), ref.block_index(), profile, "blocks");
  }
}

}  // namespace
}  // namespace kvstar::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvstar;
  if (size == 0) return 0;
  const int kind = data[0] % 5;
  const v1::ModelProfile profile = server::StoredProfile(data[0] / 5);
  const void* message = data + 1;
  const int message_bytes = static_cast<int>(size - 1);
  switch (kind) {
    case 0: {
      v1::CreateSequenceRequest request;
      if (request.ParseFromArray(message, message_bytes)) server::CheckCreate(request);
      break;
    }
    case 1: {
      v1::PutBlocksRequest request;
      if (request.ParseFromArray(message, message_bytes)) server::CheckPut(request, profile);
      break;
    }
    case 2: {
      v1::SealRequest request;
      if (request.ParseFromArray(message, message_bytes)) server::CheckSeal(request, profile);
      break;
    }
    case 3: {
      v1::RetrieveRequest request;
      if (request.ParseFromArray(message, message_bytes)) server::CheckRetrieve(request, profile);
      break;
    }
    default: {
      v1::GetBlocksRequest request;
      if (request.ParseFromArray(message, message_bytes)) server::CheckGet(request, profile);
      break;
    }
  }
  return 0;
}
