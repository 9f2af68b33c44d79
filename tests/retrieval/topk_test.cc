#include "retrieval/topk.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "retrieval/reference.h"

namespace kvstar::retrieval {
namespace {

using ::testing::ElementsAre;

TEST(TopKTest, KIsCeilOfMiddleTimesRatio) {
  Knobs knobs;  // init 1, local 2, ratio 0.25
  EXPECT_EQ(NumSelectedMiddle(3, knobs), 0u);
  EXPECT_EQ(NumSelectedMiddle(4, knobs), 1u);     // ceil(0.25)
  EXPECT_EQ(NumSelectedMiddle(7, knobs), 1u);     // ceil(1.0)
  EXPECT_EQ(NumSelectedMiddle(8, knobs), 2u);     // ceil(1.25)
  EXPECT_EQ(NumSelectedMiddle(256, knobs), 64u);  // ceil(63.25)
  knobs.sparse_ratio = 1.0f;
  EXPECT_EQ(NumSelectedMiddle(10, knobs), 7u);
}

TEST(TopKTest, WindowsAlwaysSelectedAndResultAscending) {
  Knobs knobs;
  // Windows hold the lowest scores; the middle's best are 5 and 2.
  std::vector<float> scores = {0.0f, 0.5f, 0.9f, 0.1f, 0.2f, 1.0f, 0.3f, 0.0f, 0.0f};
  EXPECT_THAT(SelectBlocks(scores, knobs), ElementsAre(0, 2, 5, 7, 8));
}

TEST(TopKTest, FewerBlocksThanWindowsSelectsAll) {
  Knobs knobs;
  knobs.init_window_sz = 2;
  knobs.local_window_sz = 3;
  EXPECT_THAT(SelectBlocks(std::vector<float>{0.3f, 0.1f, 0.2f, 0.4f}, knobs),
              ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(SelectBlocks(std::vector<float>{}, knobs), ElementsAre());
}

TEST(TopKTest, TiesGoToTheLowerBlockIndex) {
  Knobs knobs;
  knobs.init_window_sz = 0;
  knobs.local_window_sz = 0;
  knobs.sparse_ratio = 0.5f;
  std::vector<float> scores(10, 1.0f);
  EXPECT_THAT(SelectBlocks(scores, knobs), ElementsAre(0, 1, 2, 3, 4));
  scores[7] = 2.0f;
  EXPECT_THAT(SelectBlocks(scores, knobs), ElementsAre(0, 1, 2, 3, 7));
  EXPECT_EQ(SelectBlocks(scores, knobs), ReferenceSelect(scores, knobs));
}

TEST(TopKTest, MatchesReferenceOnRandomScores) {
  Knobs knobs;
  knobs.sparse_ratio = 0.3f;
  uint32_t state = 12345;
  for (uint32_t n = 0; n < 200; n += 7) {
    std::vector<float> scores(n);
    for (float& s : scores) {
      state = state * 1664525u + 1013904223u;
      s = static_cast<float>(state >> 20);  // many exact ties
    }
    EXPECT_EQ(SelectBlocks(scores, knobs), ReferenceSelect(scores, knobs)) << n;
  }
}

}  // namespace
}  // namespace kvstar::retrieval
