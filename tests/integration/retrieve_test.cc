// Seal and Retrieve against the real kvstar_server on loopback: 64 decode steps whose queries
// move attention from block to block; every selection must equal the scalar reference's (away
// from ties), new blocks arrive bit-exact and blocks the client holds are never re-sent.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/shared_segment.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "retrieval/convert.h"
#include "retrieval/reference.h"
#include "storage/block_store.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;

// SmolLM2-135M's attention shape (9 query / 3 KV heads of dim 64), 4 layers, blocks of 64 tokens.
constexpr uint32_t kLayers = 4;
constexpr uint32_t kQHeads = 9;
constexpr uint32_t kKvHeads = 3;
constexpr uint32_t kHeadDim = 64;
constexpr uint32_t kBlockSize = 64;
constexpr uint32_t kPromptBlocks = 32;
constexpr uint32_t kStride = 8;
constexpr uint32_t kSteps = 64;
constexpr uint64_t kSharedMemoryBytes = 4 << 20;

retrieval::ModelShape Shape() {
  return {kLayers, kQHeads, kKvHeads, kHeadDim, kBlockSize, retrieval::DType::kBf16};
}
retrieval::Knobs Knobs() { return retrieval::Knobs(); }  // the service's defaults

std::string ToBf16Bytes(const std::vector<float>& values) {
  std::string bytes(values.size() * 2, '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t bits = retrieval::F32ToBf16(values[i]);
    std::memcpy(&bytes[2 * i], &bits, 2);
  }
  return bytes;
}

// Each block's keys share a "topic" direction per KV head (text about one thing), plus noise; a
// few channels carry more magnitude than the rest (which channel pruning should keep). A query
// about block b points along b's topic. Values are noise.
float ChannelScale(uint32_t channel) { return channel % 9 == 0 ? 2.0f : 1.0f; }

struct SequenceData {
  // [layer][block] -> K, V bytes; topics [layer][block] -> [kv][dim]
  std::vector<std::vector<std::string>> keys, values;
  std::vector<std::vector<std::vector<float>>> topics;

  void AddBlock(uint32_t layer, std::mt19937& rng) {
    std::normal_distribution<float> normal;
    std::vector<float> topic(kKvHeads * kHeadDim);
    for (size_t i = 0; i < topic.size(); ++i)
      topic[i] = 1.5f * normal(rng) * ChannelScale(i % kHeadDim);
    std::vector<float> k(kBlockSize * kKvHeads * kHeadDim), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = topic[i % topic.size()] + normal(rng) * ChannelScale(i % kHeadDim);
      v[i] = normal(rng);
    }
    keys[layer].push_back(ToBf16Bytes(k));
    values[layer].push_back(ToBf16Bytes(v));
    topics[layer].push_back(std::move(topic));
  }
};

// Queries about block `target` of a layer: every query head points along the target's topic for
// its KV head, plus noise. Layout [kStride][kQHeads][kHeadDim].
std::string QueriesFor(const SequenceData& data, uint32_t layer, uint32_t target,
                       std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> q(kStride * kQHeads * kHeadDim);
  const std::vector<float>& topic = data.topics[layer][target];
  for (uint32_t s = 0; s < kStride; ++s) {
    for (uint32_t h = 0; h < kQHeads; ++h) {
      const uint32_t kv = h / (kQHeads / kKvHeads);
      for (uint32_t d = 0; d < kHeadDim; ++d) {
        q[(size_t{s} * kQHeads + h) * kHeadDim + d] = topic[kv * kHeadDim + d] + 0.5f * normal(rng);
      }
    }
  }
  return ToBf16Bytes(q);
}

// The reference selection for a layer whose kept channels come from the first `sealed` blocks.
struct ReferenceResult {
  std::vector<uint32_t> selected;
  std::vector<float> scores;
};

ReferenceResult Reference(const SequenceData& data, uint32_t layer, uint32_t sealed,
                          const std::string& queries) {
  std::vector<absl::Span<const uint8_t>> all, prompt;
  for (const std::string& k : data.keys[layer]) {
    all.emplace_back(reinterpret_cast<const uint8_t*>(k.data()), k.size());
  }
  prompt.assign(all.begin(), all.begin() + sealed);
  const auto kept = retrieval::ReferenceKeptChannels(Shape(), Knobs(), prompt);
  const auto repr = retrieval::ReferenceRepresentation(Shape(), Knobs(), all, kept);
  ReferenceResult result;
  result.scores = retrieval::ReferenceScores(
      Shape(), Knobs(), repr, kept, all.size(),
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(queries.data()), queries.size()),
      kStride);
  result.selected = retrieval::ReferenceSelect(result.scores, Knobs());
  return result;
}

// Equal selections, except where the reference's own scores tie within fp32 rounding at the
// top-k boundary.
void ExpectSameSelection(const std::vector<uint32_t>& got, const ReferenceResult& want,
                         const std::string& where) {
  if (got == want.selected) return;
  float boundary = INFINITY;
  for (uint32_t b : want.selected) boundary = std::min(boundary, want.scores[b]);
  ASSERT_EQ(got.size(), want.selected.size()) << where;
  for (uint32_t b : got) {
    if (std::find(want.selected.begin(), want.selected.end(), b) != want.selected.end()) continue;
    EXPECT_NEAR(want.scores[b], boundary, 1e-4f * std::abs(boundary))
        << where << ": block " << b << " selected, reference disagrees beyond a tie";
  }
}

class RetrieveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_dir_ = MakeTempDir("retrieve");
    // A small shared-memory segment: leaked regions would exhaust it within a few retrievals.
    server_ = std::make_unique<ServerProcess>(
        std::vector<std::string>{"--data_dir=" + data_dir_, "--log_level=warn",
                                 absl::StrCat("--shared_memory_bytes=", kSharedMemoryBytes)});
    ASSERT_TRUE(server_->Start().ok());
    data_.keys.resize(kLayers);
    data_.values.resize(kLayers);
    data_.topics.resize(kLayers);
    std::mt19937 rng(42);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t b = 0; b < kPromptBlocks; ++b) data_.AddBlock(layer, rng);
    }
    CreateSequence("s");
    PutBlocks(0, kPromptBlocks);
  }

  void CreateSequence(const std::string& id) {
    grpc::ClientContext context;
    v1::CreateSequenceRequest create;
    create.set_sequence_id(id);
    v1::ModelProfile* p = create.mutable_profile();
    p->set_num_layers(kLayers);
    p->set_num_q_heads(kQHeads);
    p->set_num_kv_heads(kKvHeads);
    p->set_head_dim(kHeadDim);
    p->set_block_size(kBlockSize);
    p->set_dtype(v1::DTYPE_BF16);
    v1::CreateSequenceResponse created;
    grpc::Status status = server_->stub().CreateSequence(&context, create, &created);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  void PutBlocks(uint32_t begin, uint32_t end) {
    grpc::ClientContext context;
    v1::PutBlocksResponse response;
    auto writer = server_->stub().PutBlocks(&context, &response);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::PutBlocksRequest message;
      message.set_sequence_id("s");
      for (uint32_t b = begin; b < end; ++b) {
        v1::Block* block = message.add_blocks();
        block->set_layer(layer);
        block->set_block_index(b);
        block->set_key(data_.keys[layer][b]);
        block->set_value(data_.values[layer][b]);
        block->set_checksum(storage::BlockChecksum(block->key(), block->value()));
      }
      writer->Write(message);
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  grpc::Status Seal(const std::vector<std::string>& queries, v1::SealResponse* response) {
    grpc::ClientContext context;
    v1::SealRequest request;
    request.set_sequence_id("s");
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::LayerQueries* q = request.add_queries();
      q->set_layer(layer);
      q->set_num_queries(kStride);
      q->set_queries(queries[layer]);
    }
    return server_->stub().Seal(&context, request, response);
  }

  v1::RetrieveRequest MakeRetrieve(uint64_t step, const std::vector<std::string>& queries,
                                   const std::vector<std::vector<uint32_t>>& held) {
    v1::RetrieveRequest request;
    v1::SequenceQueries* part = request.add_sequences();
    part->set_sequence_id("s");
    part->set_decode_step(step);
    part->set_include_data(true);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::LayerQueries* q = part->add_queries();
      q->set_layer(layer);
      q->set_num_queries(kStride);
      q->set_queries(queries[layer]);
      v1::HeldBlocks* h = part->add_held();
      h->set_layer(layer);
      h->mutable_block_indices()->Add(held[layer].begin(), held[layer].end());
    }
    return request;
  }

  grpc::Status Retrieve(const v1::RetrieveRequest& request,
                        std::vector<v1::RetrieveResponse>* replies) {
    grpc::ClientContext context;
    auto reader = server_->stub().Retrieve(&context, request);
    v1::RetrieveResponse reply;
    while (reader->Read(&reply)) replies->push_back(reply);
    return reader->Finish();
  }

  std::string data_dir_;
  std::unique_ptr<ServerProcess> server_;
  SequenceData data_;
};

TEST_F(RetrieveTest, SixtyFourDecodeStepsFollowMovingAttentionLikeTheReference) {
  std::mt19937 rng(7);
  uint32_t sealed = kPromptBlocks;
  std::vector<std::string> queries(kLayers);
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    queries[layer] = QueriesFor(data_, layer, 5, rng);
  v1::SealResponse sealed_reply;
  grpc::Status status = Seal(queries, &sealed_reply);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(sealed_reply.num_blocks(), kPromptBlocks);
  ASSERT_EQ(sealed_reply.selections_size(), static_cast<int>(kLayers));
  std::vector<std::vector<uint32_t>> held(kLayers);
  for (const v1::LayerSelection& s : sealed_reply.selections()) {
    std::vector<uint32_t> got(s.block_indices().begin(), s.block_indices().end());
    ExpectSameSelection(got, Reference(data_, s.layer(), sealed, queries[s.layer()]),
                        absl::StrCat("seal layer ", s.layer()));
    EXPECT_THAT(got, ::testing::Contains(5u));
    held[s.layer()] = got;
  }

  uint64_t sent = 0, skipped = 0;
  for (uint32_t step = 1; step <= kSteps; ++step) {
    // Halfway, decode fills a new block: it is offloaded and must join the candidates.
    if (step == kSteps / 2) {
      for (uint32_t layer = 0; layer < kLayers; ++layer) data_.AddBlock(layer, rng);
      PutBlocks(kPromptBlocks, kPromptBlocks + 1);
    }
    const uint32_t num_blocks = data_.keys[0].size();
    // Attention moves through the middle blocks; after the new block exists it points there.
    const uint32_t target = step >= kSteps / 2 + 4 && step % 3 == 0
                                ? num_blocks - 1 - 2  // the new block, before the local window
                                : 1 + (step * 5) % (num_blocks - 4);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      queries[layer] = QueriesFor(data_, layer, target, rng);
    }
    std::vector<v1::RetrieveResponse> replies;
    status = Retrieve(MakeRetrieve(step, queries, held), &replies);
    ASSERT_TRUE(status.ok()) << "step " << step << ": " << status.error_message();
    ASSERT_EQ(replies.size(), kLayers) << "step " << step;
    for (const v1::RetrieveResponse& reply : replies) {
      const uint32_t layer = reply.selection().layer();
      const std::string where = absl::StrCat("step ", step, " layer ", layer);
      EXPECT_EQ(reply.decode_step(), step);
      EXPECT_FALSE(reply.more());
      std::vector<uint32_t> got(reply.selection().block_indices().begin(),
                                reply.selection().block_indices().end());
      ExpectSameSelection(got, Reference(data_, layer, sealed, queries[layer]), where);
      EXPECT_THAT(got, ::testing::Contains(target)) << where;
      // Exactly the selected blocks not held arrive, bit for bit.
      std::vector<uint32_t> expected_new;
      for (uint32_t b : got) {
        if (std::find(held[layer].begin(), held[layer].end(), b) == held[layer].end()) {
          expected_new.push_back(b);
        } else {
          ++skipped;
        }
      }
      ASSERT_EQ(reply.new_blocks_size(), static_cast<int>(expected_new.size())) << where;
      for (int i = 0; i < reply.new_blocks_size(); ++i) {
        const v1::Block& block = reply.new_blocks(i);
        EXPECT_EQ(block.block_index(), expected_new[i]) << where;
        EXPECT_TRUE(block.key() == data_.keys[layer][block.block_index()]) << where;
        EXPECT_TRUE(block.value() == data_.values[layer][block.block_index()]) << where;
      }
      sent += expected_new.size();
      held[layer] = got;
    }
  }
  EXPECT_GT(sent, 0u);
  // The windows (1 + 2 blocks) stay selected every step and are held, so never re-sent.
  EXPECT_GE(skipped, uint64_t{kSteps} * kLayers * 3);

  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(server_->stub().Stats(&context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.retrievals(), kSteps);
  EXPECT_EQ(stats.blocks_sent(), sent);
  EXPECT_EQ(stats.blocks_skipped_held(), skipped);
}

TEST_F(RetrieveTest, BadRetrievesAreRejectedNamingTheField) {
  std::mt19937 rng(3);
  std::vector<std::string> queries(kLayers);
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    queries[layer] = QueriesFor(data_, layer, 9, rng);
  std::vector<std::vector<uint32_t>> held(kLayers);
  std::vector<v1::RetrieveResponse> replies;

  grpc::Status status = Retrieve(MakeRetrieve(1, queries, held), &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("not sealed"));

  v1::SealResponse sealed;
  ASSERT_TRUE(Seal(queries, &sealed).ok());
  ASSERT_TRUE(Retrieve(MakeRetrieve(10, queries, held), &replies).ok());

  status = Retrieve(MakeRetrieve(9, queries, held), &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("decode_step is 9, it went backwards from 10"));

  v1::RetrieveRequest wrong_size = MakeRetrieve(11, queries, held);
  wrong_size.mutable_sequences(0)->mutable_queries(2)->mutable_queries()->resize(100);
  status = Retrieve(wrong_size, &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("sequences[0].queries[2].queries is 100 bytes"));

  v1::RetrieveRequest bad_layer = MakeRetrieve(11, queries, held);
  bad_layer.mutable_sequences(0)->mutable_queries(1)->set_layer(kLayers);
  status = Retrieve(bad_layer, &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("sequences[0].queries[1].layer is 4"));

  v1::RetrieveRequest too_many = MakeRetrieve(11, queries, held);
  too_many.mutable_sequences(0)->mutable_queries(0)->set_num_queries(kStride + 1);
  status = Retrieve(too_many, &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("num_queries is 9"));

  v1::RetrieveRequest unknown = MakeRetrieve(11, queries, held);
  unknown.mutable_sequences(0)->set_sequence_id("nope");
  status = Retrieve(unknown, &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);

  // None of the rejected calls moved the step: 10 is still accepted.
  replies.clear();
  status = Retrieve(MakeRetrieve(10, queries, held), &replies);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(replies.size(), kLayers);

  // After a restart the representations are gone: a clean error, then Seal again recovers.
  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_TRUE(server_->Start().ok());
  status = Retrieve(MakeRetrieve(11, queries, held), &replies);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(Seal(queries, &sealed).ok());
  replies.clear();
  EXPECT_TRUE(Retrieve(MakeRetrieve(11, queries, held), &replies).ok());
  EXPECT_EQ(replies.size(), kLayers);
}

// Co-located mode: the same blocks, bit for bit, arrive as regions of the tenant's segment.
TEST_F(RetrieveTest, SharedMemoryRepliesCarryTheSameBytesAndRegionsAreRecycled) {
  grpc::ClientContext info_context;
  v1::ServerInfoResponse info;
  ASSERT_TRUE(server_->stub().GetServerInfo(&info_context, v1::ServerInfoRequest(), &info).ok());
  std::string boot_id;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;
  EXPECT_EQ(info.host_id(), boot_id);
  ASSERT_EQ(info.shared_memory_bytes(), kSharedMemoryBytes);
  // The one tenant's segment, received on the server's socket (no token: no authentication).
  absl::StatusOr<client_internal::ReceivedSegment> received =
      client_internal::ReceiveSegment(info.shared_memory_socket(), "", 5000);
  ASSERT_TRUE(received.ok()) << received.status();
  ASSERT_EQ(received->bytes, kSharedMemoryBytes);
  void* mapped = mmap(nullptr, kSharedMemoryBytes, PROT_READ, MAP_SHARED, received->fd, 0);
  close(received->fd);
  ASSERT_NE(mapped, MAP_FAILED);
  const char* segment = static_cast<const char*>(mapped);

  std::mt19937 rng(11);
  std::vector<std::string> queries(kLayers);
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    queries[layer] = QueriesFor(data_, layer, 4, rng);
  v1::SealResponse sealed;
  ASSERT_TRUE(Seal(queries, &sealed).ok());

  // Nothing held: every selected block is new on every call. 40 calls move ~40 MiB through a
  // 4 MiB segment, which works only if each call frees the previous call's regions.
  const std::vector<std::vector<uint32_t>> nothing_held(kLayers);
  uint64_t shared_blocks = 0;
  for (uint32_t step = 1; step <= 40; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      queries[layer] = QueriesFor(data_, layer, 1 + step % 28, rng);
    }
    v1::RetrieveRequest request = MakeRetrieve(step, queries, nothing_held);
    request.mutable_sequences(0)->set_shared_memory(true);
    std::vector<v1::RetrieveResponse> replies;
    grpc::Status status = Retrieve(request, &replies);
    ASSERT_TRUE(status.ok()) << status.error_message();
    for (const v1::RetrieveResponse& reply : replies) {
      const uint32_t layer = reply.selection().layer();
      ASSERT_EQ(reply.new_blocks_size(), reply.selection().block_indices_size());
      for (const v1::Block& block : reply.new_blocks()) {
        const std::string where =
            absl::StrCat("step ", step, " layer ", layer, " block ", block.block_index());
        ASSERT_TRUE(block.has_shared()) << where << ": sent as bytes, the segment ran out";
        EXPECT_TRUE(block.key().empty() && block.value().empty()) << where;
        EXPECT_EQ(block.shared().segment(), received->id);
        const std::string& key = data_.keys[layer][block.block_index()];
        const std::string& value = data_.values[layer][block.block_index()];
        ASSERT_EQ(block.shared().length(), key.size()) << where;
        ASSERT_LE(block.shared().offset() + 2 * key.size(), kSharedMemoryBytes) << where;
        const char* k = segment + block.shared().offset();
        EXPECT_EQ(std::memcmp(k, key.data(), key.size()), 0) << where;
        EXPECT_EQ(std::memcmp(k + key.size(), value.data(), value.size()), 0) << where;
        EXPECT_EQ(storage::BlockChecksum(absl::string_view(k, key.size()),
                                         absl::string_view(k + key.size(), value.size())),
                  block.checksum())
            << where;
        ++shared_blocks;
      }
    }
  }
  munmap(mapped, kSharedMemoryBytes);
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(server_->stub().Stats(&context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.blocks_sent_shared(), shared_blocks);
  EXPECT_GT(shared_blocks * 2 * data_.keys[0][0].size(), 8 * kSharedMemoryBytes);
}

// More scoring threads than cores still stream every layer of every call. (On a 16-core host,
// scoring threads that asked gRPC about cancellation themselves broke the reply stream; on two
// cores this test does not reproduce that bug — the GPU machine's retrieval_bench did.)
TEST_F(RetrieveTest, ManyScoringThreadsStreamEveryLayer) {
  ASSERT_TRUE(server_->Stop().ok());
  server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
      "--data_dir=" + data_dir_, "--log_level=warn", "--retrieval_threads=24"});
  ASSERT_TRUE(server_->Start().ok());
  std::mt19937 rng(5);
  std::vector<std::string> queries(kLayers);
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    queries[layer] = QueriesFor(data_, layer, 6, rng);
  v1::SealResponse sealed;
  ASSERT_TRUE(Seal(queries, &sealed).ok());
  const std::vector<std::vector<uint32_t>> nothing_held(kLayers);
  for (uint32_t step = 1; step <= 30; ++step) {
    std::vector<v1::RetrieveResponse> replies;
    grpc::Status status = Retrieve(MakeRetrieve(step, queries, nothing_held), &replies);
    ASSERT_TRUE(status.ok()) << "step " << step << ": " << status.error_message();
    ASSERT_EQ(replies.size(), kLayers) << "step " << step;
  }
}

TEST_F(RetrieveTest, SealNeedsEveryLayersBlocksFromZero) {
  CreateSequence("gap");
  grpc::ClientContext seal_context;
  v1::SealRequest seal;
  seal.set_sequence_id("gap");
  std::mt19937 rng(1);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    v1::LayerQueries* q = seal.add_queries();
    q->set_layer(layer);
    q->set_num_queries(kStride);
    q->set_queries(QueriesFor(data_, layer, 3, rng));
  }
  v1::SealResponse response;
  grpc::Status status = server_->stub().Seal(&seal_context, seal, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("layer 0 holds 0 blocks"));
}

}  // namespace
}  // namespace kvstar::testing
