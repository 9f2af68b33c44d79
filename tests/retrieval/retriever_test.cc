#include "retrieval/retriever.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <random>
#include <utility>

#include "gtest/gtest.h"
#include "retrieval/scorer.h"
#include "retrieval/topk.h"
#include "tests/retrieval/test_util.h"

namespace kvstar::retrieval {
namespace {

struct Sequence {
  std::unique_ptr<SequenceIndex> index;
  std::vector<std::vector<uint8_t>> queries;  // per layer
  RetrievalRequest request;
};

Sequence MakeSequence(const ModelShape& shape, uint32_t num_blocks, uint32_t num_queries,
                      std::mt19937& rng, const Knobs& knobs = Knobs()) {
  Sequence seq;
  seq.index = std::move(SequenceIndex::Create(shape, knobs).value());
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    testing::KeyBlocks keys(shape, num_blocks, rng);
    EXPECT_TRUE(seq.index->SealLayer(layer, keys.spans).ok());
    seq.queries.push_back(testing::RandomElements(
        shape.dtype, size_t{num_queries} * shape.num_q_heads * shape.head_dim, rng, 2.0f));
  }
  seq.request.index = seq.index.get();
  seq.request.num_queries = num_queries;
  for (const auto& q : seq.queries) seq.request.layer_queries.emplace_back(q);
  return seq;
}

TEST(RetrieverTest, BatchMatchesPerLayerScoringAndCallsOncePerLayer) {
  std::mt19937 rng(21);
  const ModelShape a{5, 9, 3, 64, 32, DType::kBf16};
  const ModelShape b{3, 8, 2, 40, 16, DType::kFp16};
  std::vector<Sequence> seqs;
  seqs.push_back(MakeSequence(a, 23, 8, rng));
  seqs.push_back(MakeSequence(b, 9, 3, rng));
  // An int8 sequence in the same batch as bf16 ones.
  Knobs int8;
  int8.representation_format = RepresentationFormat::kInt8;
  seqs.push_back(MakeSequence(a, 37, 5, rng, int8));
  std::vector<RetrievalRequest> requests;
  for (const Sequence& s : seqs) requests.push_back(s.request);

  for (size_t threads : {1u, 2u, 5u}) {
    Retriever retriever(threads);
    std::map<std::pair<size_t, uint32_t>, std::vector<uint32_t>> got;
    ASSERT_TRUE(retriever
                    .Retrieve(requests,
                              [&](size_t r, uint32_t layer, absl::Span<const uint32_t> selected) {
                                auto [it, inserted] = got.emplace(
                                    std::make_pair(r, layer),
                                    std::vector<uint32_t>(selected.begin(), selected.end()));
                                EXPECT_TRUE(inserted);
                              })
                    .ok());
    EXPECT_EQ(got.size(), size_t{5 + 3 + 5});
    for (size_t r = 0; r < seqs.size(); ++r) {
      for (uint32_t layer = 0; layer < seqs[r].index->shape().num_layers; ++layer) {
        std::vector<float> scores;
        ASSERT_TRUE(ScoreLayer(*seqs[r].index, layer, seqs[r].queries[layer],
                               seqs[r].request.num_queries, scores)
                        .ok());
        EXPECT_EQ(got[std::make_pair(r, layer)], SelectBlocks(scores, Knobs()))
            << r << " " << layer;
      }
    }
  }
}

// Layers of 300, 130, 40 and 9 blocks split into 4, 2, 1 and 1 chunks per head, and 80 heads in
// all, so one thread runs a head's chunks in one task and more threads split them over up to 4
// tasks: whatever the number of threads, every layer's scores (hence selection) are the same
// bits, and equal ScoreLayer's.
TEST(RetrieverTest, ScoresAreBitIdenticalForAnyThreadCount) {
  std::mt19937 rng(23);
  const ModelShape shape{40, 6, 2, 32, 16, DType::kBf16};
  const uint32_t num_queries = 5;
  auto index = SequenceIndex::Create(shape, Knobs()).value();
  std::vector<std::vector<uint8_t>> queries;
  RetrievalRequest request;
  request.index = index.get();
  request.num_queries = num_queries;
  const uint32_t blocks[] = {300, 130, 40, 9};
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    testing::KeyBlocks keys(shape, blocks[layer % 4], rng);
    ASSERT_TRUE(index->SealLayer(layer, keys.spans).ok());
    queries.push_back(testing::RandomElements(
        shape.dtype, size_t{num_queries} * shape.num_q_heads * shape.head_dim, rng, 2.0f));
  }
  for (const auto& q : queries) request.layer_queries.emplace_back(q);
  ASSERT_EQ(ChunksPerHead(blocks[0]), 4u);
  ASSERT_EQ(ChunksPerHead(blocks[1]), 2u);
  static_assert(Retriever::kTasksPerThread < 80, "one thread must run whole heads");

  std::vector<std::vector<float>> want_scores(shape.num_layers);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    ASSERT_TRUE(ScoreLayer(*index, layer, queries[layer], num_queries, want_scores[layer]).ok());
  }
  for (size_t threads : {1u, 2u, 3u, 7u}) {
    SCOPED_TRACE(threads);
    Retriever retriever(threads);
    for (int repeat = 0; repeat < 2; ++repeat) {
      std::vector<std::vector<float>> scores(shape.num_layers);
      std::vector<std::vector<uint32_t>> selected(shape.num_layers);
      ASSERT_TRUE(retriever
                      .RetrieveWithScores(
                          {request},
                          [&](size_t, uint32_t layer, absl::Span<const float> block_scores,
                              absl::Span<const uint32_t> layer_selected) {
                            scores[layer].assign(block_scores.begin(), block_scores.end());
                            selected[layer].assign(layer_selected.begin(), layer_selected.end());
                          })
                      .ok());
      for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
        EXPECT_EQ(scores[layer], want_scores[layer]) << "layer " << layer;
        EXPECT_EQ(selected[layer], SelectBlocks(want_scores[layer], Knobs())) << "layer " << layer;
      }
    }
  }
}

TEST(RetrieverTest, CancellationStopsBetweenTasks) {
  std::mt19937 rng(4);
  Sequence seq = MakeSequence({16, 4, 2, 32, 16, DType::kBf16}, 10, 2, rng);
  Retriever retriever(2);
  std::atomic<int> layers{0};
  std::atomic<int> checks{0};
  const absl::Status status = retriever.Retrieve(
      {seq.request}, [&](size_t, uint32_t, absl::Span<const uint32_t>) { ++layers; },
      [&] { return ++checks > 3; });
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(layers.load(), 16);
}

TEST(RetrieverTest, RejectsBadRequestsBeforeAnyWork) {
  std::mt19937 rng(8);
  Sequence seq = MakeSequence({2, 4, 2, 32, 16, DType::kBf16}, 4, 2, rng);
  Retriever retriever(2);
  int calls = 0;
  auto count = [&](size_t, uint32_t, absl::Span<const uint32_t>) { ++calls; };
  RetrievalRequest bad = seq.request;
  bad.layer_queries.pop_back();
  EXPECT_EQ(retriever.Retrieve({seq.request, bad}, count).code(),
            absl::StatusCode::kInvalidArgument);
  bad = seq.request;
  bad.num_queries = 3;
  EXPECT_EQ(retriever.Retrieve({bad}, count).code(), absl::StatusCode::kInvalidArgument);
  bad.index = nullptr;
  EXPECT_EQ(retriever.Retrieve({bad}, count).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(calls, 0);
  EXPECT_TRUE(retriever.Retrieve({}, count).ok());
}

TEST(RetrieverTest, SealLayersInParallelEqualsSealingOneByOne) {
  std::mt19937 rng(17);
  const ModelShape shape{6, 8, 2, 64, 16, DType::kFp16};
  std::vector<testing::KeyBlocks> keys;
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    keys.emplace_back(shape, 5 + 4 * layer, rng);  // 5..25 blocks: one and two groups
  }
  auto serial = SequenceIndex::Create(shape, Knobs()).value();
  auto parallel = SequenceIndex::Create(shape, Knobs()).value();
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    ASSERT_TRUE(serial->SealLayer(layer, keys[layer].spans).ok());
  }
  // All layers but layer 1, in a shuffled order.
  const std::vector<uint32_t> layers = {4, 0, 5, 2, 3};
  std::vector<std::vector<absl::Span<const uint8_t>>> blocks;
  for (uint32_t layer : layers) blocks.push_back(keys[layer].spans);
  Retriever retriever(3);
  ASSERT_TRUE(retriever.SealLayers(*parallel, layers, blocks).ok());
  EXPECT_FALSE(parallel->sealed(1));
  for (uint32_t layer : layers) {
    ASSERT_TRUE(parallel->sealed(layer));
    EXPECT_EQ(parallel->num_blocks(layer), serial->num_blocks(layer));
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      const auto a = parallel->kept_channels(layer, h), b = serial->kept_channels(layer, h);
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << layer << " " << h;
      const auto ra = parallel->representation(layer, h), rb = serial->representation(layer, h);
      EXPECT_TRUE(std::equal(ra.begin(), ra.end(), rb.begin(), rb.end())) << layer << " " << h;
      const auto na = parallel->group_norms(layer, h), nb = serial->group_norms(layer, h);
      EXPECT_TRUE(std::equal(na.begin(), na.end(), nb.begin(), nb.end())) << layer << " " << h;
    }
  }
}

TEST(RetrieverTest, SealLayersRejectsBadArgumentsLeavingTheIndexUnchanged) {
  std::mt19937 rng(19);
  const ModelShape shape{3, 4, 2, 32, 16, DType::kBf16};
  testing::KeyBlocks keys(shape, 4, rng);
  auto index = SequenceIndex::Create(shape, Knobs()).value();
  Retriever retriever(2);
  std::vector<uint8_t> short_block(shape.key_block_bytes() - 2);
  std::vector<absl::Span<const uint8_t>> bad_blocks = keys.spans;
  bad_blocks.back() = short_block;
  const std::vector<std::vector<absl::Span<const uint8_t>>> one = {keys.spans};
  const std::vector<std::vector<absl::Span<const uint8_t>>> two = {keys.spans, keys.spans};
  const std::vector<std::vector<absl::Span<const uint8_t>>> with_bad = {keys.spans, bad_blocks};
  EXPECT_EQ(retriever.SealLayers(*index, {0, 1}, one).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(retriever.SealLayers(*index, {0, 3}, two).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(retriever.SealLayers(*index, {2, 2}, two).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(retriever.SealLayers(*index, {0, 1}, with_bad).code(),
            absl::StatusCode::kInvalidArgument);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) EXPECT_FALSE(index->sealed(layer));
  EXPECT_TRUE(retriever.SealLayers(*index, {}, {}).ok());
}

}  // namespace
}  // namespace kvstar::retrieval
