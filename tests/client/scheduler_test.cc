// The client's per-step logic on the host backend against a fake server whose selections the test
// scripts: step-boundary visibility, slot reuse after release, incremental transfer, decode blocks,
// staleness and error surfacing.
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/device_backend.h"
#include "client/staging_pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstar/client.h"
#include "tests/client/client_test_util.h"
#include "tests/client/fake_kv_store.h"

namespace kvstar::testing {
namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::Not;

constexpr uint32_t kStride = 4;
constexpr uint32_t kBlocks = 16;  // prompt blocks per layer

// Init block 0, the local window, and four middle blocks that jump to four others every stride:
// every layer's next selection is four new blocks.
std::vector<uint32_t> JumpingSelection(uint32_t, uint32_t num_blocks, uint64_t step) {
  const uint32_t first = 1 + static_cast<uint32_t>(step / kStride) * 4 % (num_blocks - 7);
  std::vector<uint32_t> blocks = {0, first, first + 1, first + 2, first + 3};
  blocks.push_back(num_blocks - 2);
  blocks.push_back(num_blocks - 1);
  return blocks;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override { Open(SequenceOptions{0, 64}); }

  void Open(SequenceOptions options, std::string token = "",
            FakeKvStore::Selector selector = ShiftingSelection<kStride>,
            uint64_t staging_budget_bytes = ClientOptions().staging_budget_bytes) {
    client_.reset();
    fake_ = std::make_unique<FakeKvStore>();
    fake_->set_selector(selector);
    ClientOptions client_options;
    client_options.address = fake_->address();
    client_options.backend = BackendKind::kHost;
    client_options.bearer_token = token;
    client_options.staging_budget_bytes = staging_budget_bytes;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(client_options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    absl::StatusOr<Sequence*> sequence =
        client_->CreateSequence("seq", SmallProfile(), SmallConfig(kStride), options);
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    sequence_ = *sequence;
    ASSERT_TRUE(OffloadBlocks(sequence_, 0, kBlocks).ok());
    const std::string queries = MakeQueries(SmallProfile(), kStride, 1);
    absl::Status sealed = sequence_->Seal(queries.data(), kStride, MemoryKind::kHost, nullptr);
    ASSERT_TRUE(sealed.ok()) << sealed;
  }

  // One decode step of every layer except `skip`: acquire, record the query, release; then Step.
  absl::Status RunStep(int skip = -1) {
    const std::string query = MakeQueries(SmallProfile(), 1, 100 + step_++);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      if (static_cast<int>(layer) == skip) continue;
      absl::StatusOr<SlotTable> table = sequence_->Acquire(layer, nullptr);
      if (!table.ok()) return table.status();
      const char* row = query.data() + layer * SmallProfile().query_bytes();
      if (auto s = sequence_->RecordQuery(layer, row, MemoryKind::kHost, nullptr); !s.ok()) {
        return s;
      }
      if (auto s = sequence_->Release(layer, nullptr); !s.ok()) return s;
    }
    return client_->Step();
  }

  std::vector<uint32_t> VisibleBlocks(uint32_t layer) {
    absl::StatusOr<SlotTable> table = sequence_->Acquire(layer, nullptr);
    EXPECT_TRUE(table.ok()) << table.status();
    if (!table.ok()) return {};
    std::vector<uint32_t> blocks = Blocks(*table);
    ExpectTableHoldsBlocks(*table, key_bytes());
    EXPECT_TRUE(sequence_->Release(layer, nullptr).ok());
    return blocks;
  }

  uint64_t key_bytes() const { return SmallProfile().block_key_bytes(); }

  // Runs steps until a retrieval was sent and its new blocks loaded (not yet published).
  void StepUntilLoaded(uint64_t loaded_before, uint64_t new_blocks) {
    for (uint32_t i = 0; i < kStride; ++i) ASSERT_TRUE(RunStep().ok());
    ASSERT_TRUE(WaitFor([&] {
      return sequence_->stats().blocks_loaded >= loaded_before + new_blocks;
    })) << "selection never loaded";
  }

  std::unique_ptr<FakeKvStore> fake_;
  std::unique_ptr<Client> client_;
  Sequence* sequence_ = nullptr;
  uint64_t step_ = 0;
};

TEST_F(SchedulerTest, SealLoadsTheFirstSelectionBeforeReturning) {
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 1, 2, 3, 4, 14, 15));
  EXPECT_EQ(sequence_->stats().blocks_loaded, kLayers * 7u);
  EXPECT_EQ(fake_->blocks_put(), kLayers * kBlocks);
}

TEST_F(SchedulerTest, ASelectionLoadedMidStepIsVisibleOnlyAfterTheNextStep) {
  StepUntilLoaded(sequence_->stats().blocks_loaded, kLayers);
  // Loaded, but this step's table must not change under the engine.
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 1, 2, 3, 4, 14, 15));
  ASSERT_TRUE(RunStep().ok());
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 2, 3, 4, 5, 14, 15));
  EXPECT_THAT(VisibleBlocks(3), ElementsAre(0, 2, 3, 4, 5, 14, 15));
  absl::StatusOr<SlotTable> table = sequence_->Acquire(1, nullptr);
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->selection_step, kStride);
  EXPECT_EQ(table->step, kStride + 1);
  ASSERT_TRUE(sequence_->Release(1, nullptr).ok());
  EXPECT_EQ(sequence_->stats().last_staleness_steps, 1u);
}

TEST_F(SchedulerTest, BlocksAlreadyResidentAreNotSentAgain) {
  const SequenceStats before = sequence_->stats();
  StepUntilLoaded(before.blocks_loaded, kLayers);
  EXPECT_EQ(fake_->last_held(0), (std::set<uint32_t>{0, 1, 2, 3, 4, 14, 15}));
  // Only block 5 of each layer is new; the six others were held.
  EXPECT_EQ(fake_->blocks_sent(), kLayers);
  const SequenceStats after = sequence_->stats();
  EXPECT_EQ(after.blocks_loaded - before.blocks_loaded, kLayers);
  EXPECT_EQ(after.bytes_loaded - before.bytes_loaded, kLayers * 2 * key_bytes());
  EXPECT_EQ(after.blocks_already_resident - before.blocks_already_resident, kLayers * 6u);
}

TEST_F(SchedulerTest, SlotsAreReusedOnlyAfterRelease) {
  // 7 resident blocks and 8 slots: one spare.
  Open(SequenceOptions{8, 0});
  // Selections move for two strides, then stay: each needs one new slot.
  fake_->set_selector([](uint32_t layer, uint32_t num_blocks, uint64_t step) {
    return ShiftingSelection<kStride>(layer, num_blocks, std::min<uint64_t>(step, 2 * kStride));
  });
  // The engine holds layer 0's table across the boundary that replaces block 1.
  for (uint32_t i = 0; i < kStride; ++i) ASSERT_TRUE(RunStep().ok());
  absl::StatusOr<SlotTable> held = sequence_->Acquire(0, nullptr);
  ASSERT_TRUE(held.ok());
  ASSERT_EQ(held->block_indices[1], 1u);
  const int32_t slot_of_block_1 = held->host_slots[1];
  ASSERT_TRUE(WaitFor([&] { return sequence_->stats().blocks_loaded >= kLayers * 8u; }));
  ASSERT_TRUE(RunStep(/*skip=*/0).ok());  // publishes: block 1 leaves layer 0's table

  // The next selection needs one more slot in layer 0; the only candidate is block 1's, whose
  // reader has not released it: the selection is dropped and the slot keeps block 1's bytes.
  absl::Status dropped;
  for (uint32_t i = 0; i < 3 * kStride && dropped.ok(); ++i) {
    dropped = RunStep(/*skip=*/0);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a decode step's time
  }
  EXPECT_EQ(dropped.code(), absl::StatusCode::kResourceExhausted)
      << dropped << " loaded " << sequence_->stats().blocks_loaded << " published "
      << sequence_->stats().selections_published << " step " << sequence_->stats().decode_step
      << " retrievals " << client_->stats().retrievals_sent << " replies "
      << client_->stats().retrieve_replies;
  EXPECT_GE(sequence_->stats().selections_dropped, 1u);
  const char* slot = static_cast<const char*>(held->slot_pool) + slot_of_block_1 * held->slot_bytes;
  const v1::Block block_1 = TestBlock(kSeed, 0, 1, key_bytes());
  EXPECT_EQ(std::memcmp(slot, block_1.key().data(), key_bytes()), 0);

  // After the release, the slot is reused.
  ASSERT_TRUE(sequence_->Release(0, nullptr).ok());
  std::vector<uint32_t> visible;
  ASSERT_TRUE(WaitFor([&] {
    if (!RunStep().ok()) return false;
    visible = VisibleBlocks(0);
    return visible == std::vector<uint32_t>{0, 3, 4, 5, 6, 14, 15};
  }));
  absl::StatusOr<SlotTable> table = sequence_->Acquire(0, nullptr);
  ASSERT_TRUE(table.ok());
  EXPECT_THAT(std::vector<int32_t>(table->host_slots, table->host_slots + table->count),
              Contains(slot_of_block_1));
  ExpectTableHoldsBlocks(*table, key_bytes());
  ASSERT_TRUE(sequence_->Release(0, nullptr).ok());
}

TEST_F(SchedulerTest, DecodeBlocksAreOffloadedAndJoinTheTableAtTheNextStep) {
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const v1::Block block = TestBlock(kSeed, layer, kBlocks, key_bytes());
    ASSERT_TRUE(sequence_
                    ->AppendBlock(layer, block.key().data(), block.value().data(),
                                  MemoryKind::kHost, nullptr)
                    .ok());
  }
  EXPECT_THAT(VisibleBlocks(2), Not(Contains(kBlocks)));
  ASSERT_TRUE(RunStep().ok());
  EXPECT_THAT(VisibleBlocks(2), Contains(kBlocks));
  ASSERT_TRUE(sequence_->Flush().ok());
  EXPECT_TRUE(fake_->has_block(3, kBlocks));
  EXPECT_EQ(sequence_->stats().blocks_offloaded, kLayers * (kBlocks + 1));
  // The next selection knows the block: the fake keeps the last two as the local window.
  StepUntilLoaded(sequence_->stats().blocks_loaded, kLayers);
  ASSERT_TRUE(RunStep().ok());
  EXPECT_THAT(VisibleBlocks(2), ElementsAre(0, 2, 3, 4, 5, kBlocks - 1, kBlocks));
}

TEST_F(SchedulerTest, StalenessStaysWithinStridePlusOne) {
  for (uint32_t i = 0; i < 6 * kStride; ++i) {
    ASSERT_TRUE(RunStep().ok());
    // A real engine's step takes milliseconds; give the loader the same.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const SequenceStats stats = sequence_->stats();
  EXPECT_GE(stats.selections_published, 5u * kLayers);
  EXPECT_LE(stats.max_staleness_steps, kStride + 1);
  EXPECT_EQ(client_->stats().retrievals_skipped, 0u);
}

TEST_F(SchedulerTest, RetrieveErrorSurfacesOnceOnStepAndDecodingGoesOn) {
  fake_->FailRetrieveWith(grpc::Status(grpc::StatusCode::UNAVAILABLE, "node is draining"));
  absl::Status failed;
  for (uint32_t i = 0; i < 4 * kStride && failed.ok(); ++i) {
    failed = RunStep();
    if (failed.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_THAT(std::string(failed.message()), ::testing::HasSubstr("node is draining"));
  EXPECT_TRUE(RunStep().ok());  // reported once
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 1, 2, 3, 4, 14, 15));
}

TEST_F(SchedulerTest, BlockBytesThatFailTheirChecksumNeverReachASlot) {
  // The first retrieval brings block 5 into every layer; layer 0's copy arrives damaged.
  fake_->CorruptStoredBlock(0, 5);
  absl::Status failed;
  for (uint32_t i = 0; i < 4 * kStride && failed.ok(); ++i) {
    failed = RunStep();
    if (failed.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(failed.code(), absl::StatusCode::kDataLoss) << failed;
  EXPECT_THAT(std::string(failed.message()),
              ::testing::HasSubstr("block 5 of layer 0 of sequence seq arrived with bytes that "
                                   "do not match its checksum"));
  EXPECT_GE(sequence_->stats().selections_dropped, 1u);
  ASSERT_TRUE(RunStep().ok());
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 1, 2, 3, 4, 14, 15));  // the old table stays
  EXPECT_THAT(VisibleBlocks(1), ElementsAre(0, 2, 3, 4, 5, 14, 15));  // intact layers load
}

TEST_F(SchedulerTest, ARetrievalStillInFlightIsNotDuplicated) {
  fake_->CloseGate();
  for (uint32_t i = 0; i < 3 * kStride; ++i) ASSERT_TRUE(RunStep().ok());
  EXPECT_GE(client_->stats().retrievals_skipped, 1u);
  fake_->OpenGate();
  EXPECT_TRUE(WaitFor([&] { return client_->stats().retrieve_replies >= kLayers; }));
}

TEST_F(SchedulerTest, ARetrievalLargerThanTheStagingBudgetLoadsWithoutMoreSteps) {
  // Staging for two layers' new blocks (4 of 64 KiB each); the next selection brings four new
  // blocks in each of the four layers. Its staging must come back as each layer's copy completes,
  // not when the engine's next Steps publish the layers.
  Open(SequenceOptions{0, 64}, "", JumpingSelection, 8 * key_bytes() * 2);
  const uint64_t loaded = sequence_->stats().blocks_loaded;
  for (uint32_t i = 0; i < kStride; ++i) ASSERT_TRUE(RunStep().ok());
  if (!WaitFor([&] { return client_->stats().retrievals_completed >= 1; })) {
    ADD_FAILURE() << "the retrieval waits for staging that only later Steps give back";
    std::_Exit(1);  // its thread cannot be joined
  }
  EXPECT_EQ(sequence_->stats().blocks_loaded, loaded + 4 * kLayers);
  EXPECT_EQ(sequence_->stats().selections_dropped, 0u);
  ASSERT_TRUE(RunStep().ok());
  EXPECT_THAT(VisibleBlocks(0), ElementsAre(0, 5, 6, 7, 8, 14, 15));
  EXPECT_TRUE(client_->DropSequence("seq").ok());
}

TEST_F(SchedulerTest, BearerTokenTravelsAsAuthorizationMetadata) {
  Open(SequenceOptions{0, 64}, "s3cret");
  EXPECT_EQ(fake_->authorization(), "Bearer s3cret");
}

TEST_F(SchedulerTest, CallsOutOfOrderAreRejectedNotCrashes) {
  EXPECT_EQ(sequence_->Acquire(kLayers, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sequence_->Release(0, nullptr).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(sequence_->Acquire(0, nullptr).ok());
  EXPECT_EQ(sequence_->Acquire(0, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(sequence_->Release(0, nullptr).ok());
  absl::StatusOr<Sequence*> unsealed =
      client_->CreateSequence("unsealed", SmallProfile(), SmallConfig(kStride), {0, 64});
  ASSERT_TRUE(unsealed.ok());
  EXPECT_EQ((*unsealed)->Acquire(0, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*unsealed)->Reseal().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(client_->CreateSequence("seq", SmallProfile(), SmallConfig(), {0, 64}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(client_->CreateSequence("bad", ModelProfile{}, SmallConfig(), {0, 64}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->CreateSequence("bad", SmallProfile(), SmallConfig(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BackendTest, AutoFallsBackToTheHostBackendWhenCudaIsUnusable) {
  absl::Status cuda = client_internal::CudaUsable(0);
  ClientOptions options;
  options.address = "127.0.0.1:1";
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->backend(), cuda.ok() ? BackendKind::kCuda : BackendKind::kHost);
  options.backend = BackendKind::kCuda;
  absl::StatusOr<std::unique_ptr<Client>> forced = Client::Connect(options);
  if (cuda.ok()) {
    EXPECT_TRUE(forced.ok());
  } else {
    EXPECT_EQ(forced.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(forced.status().message()), ::testing::HasSubstr("unusable"));
  }
}

TEST(StagingPoolTest, WaitsForABufferWhenTheBudgetIsInUseAndReusesBySize) {
  std::unique_ptr<client_internal::DeviceBackend> host = client_internal::MakeHostBackend();
  client_internal::StagingPool pool(host.get(), 1000);
  EXPECT_EQ(pool.Acquire(1001).status().code(), absl::StatusCode::kResourceExhausted);
  absl::StatusOr<void*> first = pool.Acquire(600);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(pool.TryAcquire(600).status().code(), absl::StatusCode::kUnavailable);
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pool.Release(*first);
  });
  absl::StatusOr<void*> second = pool.Acquire(600);
  releaser.join();
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(*second, *first);
  pool.Release(*second);
  EXPECT_EQ(pool.bytes_in_use(), 0u);
}

}  // namespace
}  // namespace kvstar::testing
