// Request validation: every rejection names the field and its value; defaults are filled in.
#include "server/validation.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvstar::server {
namespace {

using ::testing::HasSubstr;

v1::ModelProfile Profile() {
  v1::ModelProfile p;
  p.set_num_layers(4);
  p.set_num_q_heads(8);
  p.set_num_kv_heads(2);
  p.set_head_dim(64);
  p.set_dtype(v1::DTYPE_FP16);
  return p;
}

TEST(ValidationTest, ProfileDefaultsBlockSizeAndConfigDefaultsEveryKnob) {
  absl::StatusOr<v1::ModelProfile> profile = NormalizeProfile(Profile());
  ASSERT_TRUE(profile.ok());
  EXPECT_EQ(profile->block_size(), 128u);
  absl::StatusOr<v1::KvstarConfig> config = NormalizeConfig(v1::KvstarConfig(), *profile);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->init_window_sz(), 1u);
  EXPECT_EQ(config->local_window_sz(), 2u);
  EXPECT_FLOAT_EQ(config->sparse_ratio(), 0.25f);
  EXPECT_EQ(config->retrieval_stride(), 8u);
  EXPECT_FLOAT_EQ(config->blk_repre_dim_prune_ratio(), 0.25f);
  EXPECT_EQ(config->blk_repre_inner_token_merge(), 2u);
  EXPECT_EQ(BlockKeyBytes(*profile), 128u * 2 * 64 * 2);
  EXPECT_EQ(QueryRowBytes(*profile), 8u * 64 * 2);
}

TEST(ValidationTest, BadProfilesAndKnobsNameTheField) {
  struct Case {
    std::function<void(v1::ModelProfile&, v1::KvstarConfig&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto& p, auto&) { p.set_num_layers(0); }, "profile.num_layers is 0"},
      {[](auto& p, auto&) { p.set_num_kv_heads(3); }, "not a multiple of profile.num_kv_heads (3)"},
      {[](auto& p, auto&) { p.set_num_kv_heads(16); }, "profile.num_kv_heads is 16"},
      {[](auto& p, auto&) { p.set_head_dim(2000); }, "profile.head_dim is 2000"},
      {[](auto& p, auto&) { p.set_dtype(v1::DTYPE_UNSPECIFIED); },
       "profile.dtype is DTYPE_UNSPECIFIED"},
      {[](auto& p, auto&) { p.set_dtype(static_cast<v1::DType>(17)); },
       "profile.dtype is 17 (unknown)"},
      // The largest in-range profile: 256 GiB of K per block.
      {[](auto& p, auto&) {
         p.set_num_q_heads(kMaxHeads);
         p.set_num_kv_heads(kMaxHeads);
         p.set_head_dim(kMaxHeadDim);
         p.set_block_size(kMaxBlockSize);
         p.set_dtype(v1::DTYPE_FP32);
       },
       "one block is 549755813888 bytes"},
      // Just over the limit: 2 x 1025 tokens x 128 heads x 1024 dims x 4 bytes.
      {[](auto& p, auto&) {
         p.set_num_q_heads(128);
         p.set_num_kv_heads(128);
         p.set_head_dim(1024);
         p.set_block_size(1025);
         p.set_dtype(v1::DTYPE_FP32);
       },
       "at most 1073741824 allowed"},
      {[](auto&, auto& c) { c.set_sparse_ratio(0); }, "config.sparse_ratio = 0"},
      {[](auto&, auto& c) { c.set_sparse_ratio(1.5f); }, "config.sparse_ratio = 1.5"},
      {[](auto&, auto& c) { c.set_retrieval_stride(0); }, "config.retrieval_stride is 0"},
      {[](auto&, auto& c) { c.set_blk_repre_inner_token_merge(3); },
       "config.blk_repre_inner_token_merge = 3"},
      {[](auto&, auto& c) { c.set_blk_repre_dim_prune_ratio(0.001f); },
       "config.blk_repre_dim_prune_ratio"},
  };
  for (const Case& c : cases) {
    v1::ModelProfile profile = Profile();
    v1::KvstarConfig config;
    c.change(profile, config);
    absl::Status status = NormalizeProfile(profile).status();
    if (status.ok()) status = NormalizeConfig(config, *NormalizeProfile(profile)).status();
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << c.message;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
  }
}

TEST(ValidationTest, BlocksAndQueriesMustMatchTheProfile) {
  const v1::ModelProfile profile = *NormalizeProfile(Profile());
  const v1::KvstarConfig config = *NormalizeConfig(v1::KvstarConfig(), profile);
  v1::Block block;
  block.set_layer(1);
  block.mutable_key()->resize(BlockKeyBytes(profile));
  block.mutable_value()->resize(BlockKeyBytes(profile));
  EXPECT_TRUE(ValidateBlock(block, profile, "blocks[0]").ok());
  block.mutable_value()->resize(10);
  EXPECT_THAT(std::string(ValidateBlock(block, profile, "blocks[0]").message()),
              HasSubstr("value 10 bytes"));
  block.set_layer(4);
  EXPECT_THAT(std::string(ValidateBlock(block, profile, "blocks[2]").message()),
              HasSubstr("blocks[2].layer is 4"));

  v1::LayerQueries queries;
  queries.set_layer(0);
  queries.set_num_queries(8);
  queries.mutable_queries()->resize(8 * QueryRowBytes(profile));
  EXPECT_TRUE(ValidateLayerQueries(queries, profile, config.retrieval_stride(), "q").ok());
  queries.set_num_queries(9);
  EXPECT_THAT(
      std::string(ValidateLayerQueries(queries, profile, config.retrieval_stride(), "q").message()),
      HasSubstr("q.num_queries is 9"));
  // A Seal may vote with more of the prompt's queries than a Retrieve with decode queries.
  queries.mutable_queries()->resize(9 * QueryRowBytes(profile));
  EXPECT_TRUE(ValidateLayerQueries(queries, profile, 128, "q").ok());
  EXPECT_THAT(std::string(ValidateSequenceId(std::string(101, 'x')).message()),
              HasSubstr("101 bytes"));
  EXPECT_FALSE(ValidateSequenceId("").ok());
}

TEST(ValidationTest, LargeRealProfilesAreAccepted) {
  // 128 tokens x 8 KV heads x dim 128 in bf16: 512 KiB per block.
  v1::ModelProfile profile = Profile();
  profile.set_num_q_heads(64);
  profile.set_num_kv_heads(8);
  profile.set_head_dim(128);
  EXPECT_TRUE(NormalizeProfile(profile).ok());
  // Exactly at the limit: 2 x 1024 tokens x 128 heads x 1024 dims x 4 bytes = 1 GiB.
  profile.set_num_q_heads(128);
  profile.set_num_kv_heads(128);
  profile.set_head_dim(1024);
  profile.set_block_size(1024);
  profile.set_dtype(v1::DTYPE_FP32);
  EXPECT_TRUE(NormalizeProfile(profile).ok()) << NormalizeProfile(profile).status();
}

TEST(ValidationTest, BadSequenceIdsAreInvalidArgumentNamingTheFieldWithTheIdEscaped) {
  struct Case {
    std::string id;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"evil\n[info] forged", R"(sequence_id "evil\n[info] forged" holds control character 0x0a)"},
      {"cr\rlf", "control character 0x0d at byte 2"},
      {std::string("nul\0", 4), "control character 0x00 at byte 3"},
      {"del\x7f", "control character 0x7f"},
      {"bad\xff", R"(sequence_id "bad\xff" is not valid UTF-8 (byte 0xff at byte 3))"},
      {"\xc3", "not valid UTF-8 (byte 0xc3 at byte 0)"},        // truncated
      {"\xc0\xaf", "not valid UTF-8"},                          // overlong '/'
      {"\xed\xa0\x80", "not valid UTF-8"},                      // a surrogate
      {"\xf4\x90\x80\x80", "not valid UTF-8"},                  // above U+10FFFF
      {"ok\xe2\x82", "not valid UTF-8 (byte 0xe2 at byte 2)"},  // cut short
  };
  for (const Case& c : cases) {
    const absl::Status status = ValidateSequenceId(c.id);
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << c.message;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
    EXPECT_EQ(std::string(status.message()).find('\n'), std::string::npos) << status;
  }
  for (const std::string id :
       {"plain-id", "tenant/seq:7", "d\xc3\xa9j\xc3\xa0 vu", "\xf0\x9f\x99\x82"}) {
    EXPECT_TRUE(ValidateSequenceId(id).ok()) << ValidateSequenceId(id);
  }
}

}  // namespace
}  // namespace kvstar::server
