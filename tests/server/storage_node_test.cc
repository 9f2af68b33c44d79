// The storage node's core, in-process, over a real RocksDB store (and the memory store): create,
// put, seal, retrieve, get, drop and stats without gRPC, and the locking that keeps one
// sequence's store I/O from stalling another's calls.
#include "server/storage_node.h"

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/validation.h"
#include "storage/block_store.h"
#include "tests/integration/block_fixtures.h"

namespace kvstar::server {
namespace {

using ::testing::HasSubstr;

constexpr uint32_t kLayers = 3;
constexpr uint32_t kBlocks = 8;

v1::ModelProfile SmallProfile() {
  v1::ModelProfile profile;
  profile.set_num_layers(kLayers);
  profile.set_num_q_heads(4);
  profile.set_num_kv_heads(2);
  profile.set_head_dim(64);
  profile.set_block_size(16);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

uint64_t KeyBytes() { return BlockKeyBytes(*NormalizeProfile(SmallProfile())); }

storage::BlockData Block(uint64_t seed, uint32_t layer, uint32_t index) {
  v1::Block block = testing::MakeBf16Block(seed, layer, index, KeyBytes());
  storage::BlockData data;
  data.id = {layer, index};
  data.checksum = block.checksum();
  data.key = std::move(*block.mutable_key());
  data.value = std::move(*block.mutable_value());
  return data;
}

// Forwards to a real store; DropSequence and PutSequence can be held at a gate until the test
// opens it, so a test can look at the node while the store is busy.
class GatedStore final : public storage::BlockStore {
 public:
  explicit GatedStore(std::unique_ptr<storage::BlockStore> store) : store_(std::move(store)) {}

  // The next DropSequence (PutSequence) announces itself on `entered` and waits for `open`.
  void GateDrop() { gate_drop_ = true; }
  void GatePutSequence() { gate_put_sequence_ = true; }
  absl::Notification entered;
  absl::Notification open;

  absl::Status PutSequence(absl::string_view key, absl::string_view metadata) override {
    if (gate_put_sequence_.exchange(false)) Wait();
    return store_->PutSequence(key, metadata);
  }
  absl::StatusOr<std::string> GetSequence(absl::string_view key) override {
    return store_->GetSequence(key);
  }
  absl::StatusOr<std::vector<std::string>> ListSequences() override {
    return store_->ListSequences();
  }
  absl::Status PutBlocks(absl::string_view key, absl::Span<const storage::BlockWrite> b) override {
    return store_->PutBlocks(key, b);
  }
  absl::Status GetBlocks(absl::string_view key, absl::Span<const storage::BlockId> ids,
                         std::vector<storage::BlockData>* out) override {
    return store_->GetBlocks(key, ids, out);
  }
  absl::StatusOr<std::vector<storage::BlockId>> ListBlocks(absl::string_view key) override {
    return store_->ListBlocks(key);
  }
  absl::StatusOr<storage::DropResult> DropSequence(absl::string_view key) override {
    if (gate_drop_.exchange(false)) Wait();
    return store_->DropSequence(key);
  }
  std::vector<storage::TierStats> Stats() override { return store_->Stats(); }

 private:
  void Wait() {
    entered.Notify();
    open.WaitForNotification();
  }
  std::unique_ptr<storage::BlockStore> store_;
  std::atomic<bool> gate_drop_{false};
  std::atomic<bool> gate_put_sequence_{false};
};

std::string TempDir(const std::string& name) {
  const char* root = std::getenv("TEST_TMPDIR");
  std::string pattern = absl::StrCat(root != nullptr ? root : "/tmp", "/", name, "XXXXXX");
  return mkdtemp(pattern.data());
}

class StorageNodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto rocksdb = storage::OpenRocksDbStore(TempDir("node"));
    ASSERT_TRUE(rocksdb.ok()) << rocksdb.status();
    store_ = std::make_unique<GatedStore>(*std::move(rocksdb));
    NodeOptions options;
    options.retrieval_threads = 2;
    options.put_batch_bytes = 4 * 2 * KeyBytes();  // a batch every 4 blocks
    auto node = StorageNode::Create(store_.get(), options);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
  }

  void CreateAndPut(const std::string& tenant, const std::string& id, uint64_t seed) {
    ASSERT_TRUE(node_->CreateSequence(tenant, id, SmallProfile(), v1::KvstarConfig()).ok());
    std::unique_ptr<PutStream> put = node_->NewPutStream(tenant);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      std::vector<storage::BlockData> message;
      for (uint32_t index = 0; index < kBlocks; ++index) {
        message.push_back(Block(seed, layer, index));
      }
      ASSERT_TRUE(put->Add(id, std::move(message)).ok());
    }
    ASSERT_TRUE(put->Flush().ok());
    EXPECT_EQ(put->blocks_written(), kLayers * kBlocks);
    EXPECT_EQ(put->bytes_written(), kLayers * kBlocks * 2 * KeyBytes());
    EXPECT_EQ(put->queued_bytes(), 0u);
  }

  v1::SealRequest SealRequest(const std::string& id) {
    v1::SealRequest request;
    request.set_sequence_id(id);
    const NodeOptions options;
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::LayerQueries* queries = request.add_queries();
      queries->set_layer(layer);
      queries->set_num_queries(2);
      std::string bytes(2 * 4 * 64 * 2, '\0');
      testing::FillBf16Normal(layer + 100, &bytes);
      queries->set_queries(bytes);
    }
    return request;
  }

  std::unique_ptr<GatedStore> store_;
  std::unique_ptr<StorageNode> node_;
};

TEST_F(StorageNodeTest, CreateIsIdempotentAndRefusesAnotherProfile) {
  auto first = node_->CreateSequence("t", "seq", SmallProfile(), v1::KvstarConfig());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->created);
  EXPECT_EQ(first->profile.block_size(), 16u);
  EXPECT_GT(first->config.retrieval_stride(), 0u);  // defaults filled in
  auto again = node_->CreateSequence("t", "seq", SmallProfile(), v1::KvstarConfig());
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
  v1::ModelProfile other = SmallProfile();
  other.set_num_layers(4);
  auto different = node_->CreateSequence("t", "seq", other, v1::KvstarConfig());
  EXPECT_EQ(different.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(different.status().message(), HasSubstr("different profile"));
  // Another tenant's id of the same name is another sequence.
  auto other_tenant = node_->CreateSequence("u", "seq", other, v1::KvstarConfig());
  ASSERT_TRUE(other_tenant.ok());
  EXPECT_TRUE(other_tenant->created);
  EXPECT_EQ(node_->Stats().sequences, 2u);
}

TEST_F(StorageNodeTest, BadBlocksAreRefusedNamingTheMessageAndTheBlock) {
  ASSERT_TRUE(node_->CreateSequence("t", "seq", SmallProfile(), v1::KvstarConfig()).ok());
  std::unique_ptr<PutStream> put = node_->NewPutStream("t");
  ASSERT_TRUE(put->Add("seq", {Block(1, 0, 0)}).ok());
  std::vector<storage::BlockData> bad = {Block(1, 0, 1)};
  bad[0].value[5] ^= 1;
  absl::Status status = put->Add("seq", std::move(bad));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("PutBlocks message 1: blocks[0] (layer 0, block 1)"));
  EXPECT_THAT(status.message(), HasSubstr("checksum"));

  std::vector<storage::BlockData> short_key = {Block(1, 0, 2)};
  short_key[0].key.resize(10);
  status = put->Add("seq", std::move(short_key));
  EXPECT_THAT(status.message(), HasSubstr("key is 10 bytes"));

  status = put->Add("missing", {Block(1, 0, 3)});
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr("sequence_id missing is not stored"));

  status = put->Add("seq", {Block(1, 0, 4), Block(1, 0, 4)});
  EXPECT_THAT(status.message(), HasSubstr("appears twice"));

  status = put->Add("seq", {Block(1, kLayers, 0)});
  EXPECT_THAT(status.message(), HasSubstr("blocks[0].layer is 3"));
}

TEST_F(StorageNodeTest, PutBlocksComeBackBitForBitInReplies) {
  CreateAndPut("t", "seq", 5);
  size_t received = 0;
  absl::Status status = node_->GetBlocks("t", "seq", {}, [&](std::vector<storage::BlockData>& b) {
    for (const storage::BlockData& block : b) {
      const storage::BlockData expected = Block(5, block.id.layer, block.id.block_index);
      EXPECT_EQ(block.key, expected.key);
      EXPECT_EQ(block.value, expected.value);
      ++received;
    }
    return true;
  });
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(received, kLayers * kBlocks);
  EXPECT_EQ(node_->Stats().blocks_put, kLayers * kBlocks);

  // Another tenant does not see it.
  status = node_->GetBlocks("u", "seq", {}, [](std::vector<storage::BlockData>&) { return true; });
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  // A sink that went away stops the call.
  status = node_->GetBlocks("t", "seq", {}, [](std::vector<storage::BlockData>&) { return false; });
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
}

TEST_F(StorageNodeTest, SealThenRetrieveSendsEveryLayerAndOnlyBlocksNotHeld) {
  CreateAndPut("t", "seq", 9);
  absl::StatusOr<SealResult> sealed = node_->Seal("t", SealRequest("seq"));
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  EXPECT_EQ(sealed->num_blocks, kBlocks);
  ASSERT_EQ(sealed->selections.size(), kLayers);
  for (const auto& selection : sealed->selections) EXPECT_FALSE(selection.empty());

  v1::RetrieveRequest request;
  v1::SequenceQueries* part = request.add_sequences();
  part->set_sequence_id("seq");
  part->set_decode_step(8);
  part->set_include_data(true);
  const v1::SealRequest seal = SealRequest("seq");
  *part->mutable_queries() = seal.queries();
  // The client holds layer 1's first selected block.
  v1::HeldBlocks* held = part->add_held();
  held->set_layer(1);
  held->add_block_indices(sealed->selections[1][0]);

  std::vector<int> layers_seen(kLayers, 0);
  size_t blocks_sent = 0;
  absl::Status status = node_->Retrieve(
      "t", request,
      [&](RetrievedLayer& layer) {
        EXPECT_EQ(layer.request, 0u);
        ++layers_seen[layer.layer];
        for (const storage::BlockData& block : layer.blocks) {
          EXPECT_EQ(block.key, Block(9, block.id.layer, block.id.block_index).key);
          EXPECT_FALSE(layer.layer == 1 && block.id.block_index == sealed->selections[1][0]);
        }
        blocks_sent += layer.blocks.size();
        return true;
      },
      [] { return false; });
  ASSERT_TRUE(status.ok()) << status;
  for (int seen : layers_seen) EXPECT_EQ(seen, 1);
  const NodeStats stats = node_->Stats();
  EXPECT_EQ(stats.blocks_skipped_held, 1u);
  EXPECT_EQ(stats.blocks_sent, blocks_sent);
  EXPECT_EQ(stats.retrievals, 1u);

  // Steps never go backwards; a cancelled call answers CANCELLED.
  part->set_decode_step(7);
  status = node_->Retrieve(
      "t", request, [](RetrievedLayer&) { return true; }, [] { return false; });
  EXPECT_THAT(status.message(), HasSubstr("decode_step is 7, it went backwards from 8"));
  part->set_decode_step(9);
  status = node_->Retrieve(
      "t", request, [](RetrievedLayer&) { return true; }, [] { return true; });
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
}

TEST_F(StorageNodeTest, RetrieveBeforeSealIsAFailedPrecondition) {
  CreateAndPut("t", "seq", 3);
  v1::RetrieveRequest request;
  request.add_sequences()->set_sequence_id("seq");
  absl::Status status = node_->Retrieve(
      "t", request, [](RetrievedLayer&) { return true; }, [] { return false; });
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("sequences[0]: sequence_id seq is not sealed"));
}

TEST_F(StorageNodeTest, RetrieveAccountsItsWallTimeByPhase) {
  CreateAndPut("t", "seq", 9);
  ASSERT_TRUE(node_->Seal("t", SealRequest("seq")).ok());
  v1::RetrieveRequest request;
  v1::SequenceQueries* part = request.add_sequences();
  part->set_sequence_id("seq");
  part->set_decode_step(8);
  part->set_include_data(true);
  *part->mutable_queries() = SealRequest("seq").queries();
  // A reader that takes 2 ms per reply: the node's time handing replies over says so.
  constexpr int64_t kReaderMicros = 2000;
  absl::Status status = node_->Retrieve(
      "t", request,
      [&](RetrievedLayer&) {
        absl::SleepFor(absl::Microseconds(kReaderMicros));
        return true;
      },
      [] { return false; });
  ASSERT_TRUE(status.ok()) << status;
  const NodeStats stats = node_->Stats();
  EXPECT_GE(stats.retrieve_send_micros, kLayers * kReaderMicros);
  EXPECT_GT(stats.retrieve_score_micros, 0u);
  // The sending thread's phases are disjoint parts of the whole.
  EXPECT_LE(stats.retrieve_wait_micros + stats.retrieve_read_micros + stats.retrieve_copy_micros +
                stats.retrieve_send_micros,
            stats.retrieve_micros);
  EXPECT_EQ(stats.retrieve_copy_micros, 0u);  // no shared-memory segment here: nothing copied
}

TEST_F(StorageNodeTest, DropRemovesTheSequenceAndTheIdCanBeCreatedAgain) {
  CreateAndPut("t", "seq", 2);
  absl::StatusOr<storage::DropResult> dropped = node_->DropSequence("t", "seq");
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(dropped->blocks, kLayers * kBlocks);
  EXPECT_EQ(node_->DropSequence("t", "seq").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(node_->Stats().sequences, 0u);
  auto created = node_->CreateSequence("t", "seq", SmallProfile(), v1::KvstarConfig());
  ASSERT_TRUE(created.ok());
  EXPECT_TRUE(created->created);
}

TEST_F(StorageNodeTest, OtherSequencesAreServedWhileTheStoreDropsOne) {
  CreateAndPut("t", "big", 1);
  CreateAndPut("t", "other", 2);
  store_->GateDrop();
  std::thread dropper([&] { EXPECT_TRUE(node_->DropSequence("t", "big").ok()); });
  store_->entered.WaitForNotification();
  // The store is inside DropSequence: every call on other sequences still completes.
  CreateAndPut("t", "third", 3);
  EXPECT_TRUE(
      node_
          ->GetBlocks("t", "other", {{0, 0}}, [](std::vector<storage::BlockData>&) { return true; })
          .ok());
  EXPECT_TRUE(node_->Seal("t", SealRequest("other")).ok());
  EXPECT_TRUE(node_->DropSequence("t", "third").ok());
  // The sequence being dropped is gone for new calls already.
  EXPECT_EQ(node_->Seal("t", SealRequest("big")).status().code(), absl::StatusCode::kNotFound);
  // A Create of the same id waits for the drop, then creates it anew.
  std::atomic<bool> recreated{false};
  std::thread creator([&] {
    auto created = node_->CreateSequence("t", "big", SmallProfile(), v1::KvstarConfig());
    EXPECT_TRUE(created.ok() && created->created);
    recreated = true;
  });
  EXPECT_FALSE(recreated.load());
  store_->open.Notify();
  dropper.join();
  creator.join();
  EXPECT_TRUE(recreated.load());
  EXPECT_EQ(node_->Stats().sequences, 2u);  // other, big
}

TEST_F(StorageNodeTest, OtherCallsProceedWhileACreateWaitsForItsSyncedWrite) {
  CreateAndPut("t", "other", 2);
  store_->GatePutSequence();
  std::thread creator([&] {
    auto created = node_->CreateSequence("t", "slow", SmallProfile(), v1::KvstarConfig());
    EXPECT_TRUE(created.ok() && created->created);
  });
  store_->entered.WaitForNotification();
  EXPECT_TRUE(node_->Seal("t", SealRequest("other")).ok());
  EXPECT_EQ(node_->Stats().sequences, 1u);  // "slow" is not created until the store says so
  EXPECT_EQ(node_->NewPutStream("t")->Add("slow", {Block(1, 0, 0)}).code(),
            absl::StatusCode::kNotFound);
  store_->open.Notify();
  creator.join();
  EXPECT_EQ(node_->Stats().sequences, 2u);
}

TEST_F(StorageNodeTest, ConcurrentCreatesOfOneIdCreateItOnce) {
  std::atomic<int> created{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      auto result = node_->CreateSequence("t", "same", SmallProfile(), v1::KvstarConfig());
      ASSERT_TRUE(result.ok()) << result.status();
      created += result->created;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(created.load(), 1);
}

TEST(StorageNodeReopenTest, SequencesSurviveANewNodeOverTheSameStore) {
  const std::string dir = TempDir("reopen");
  {
    auto store = storage::OpenRocksDbStore(dir);
    ASSERT_TRUE(store.ok());
    auto node = StorageNode::Create(store->get(), NodeOptions());
    ASSERT_TRUE(node.ok());
    ASSERT_TRUE((*node)->CreateSequence("t", "kept", SmallProfile(), v1::KvstarConfig()).ok());
  }
  auto store = storage::OpenRocksDbStore(dir);
  ASSERT_TRUE(store.ok());
  auto node = StorageNode::Create(store->get(), NodeOptions());
  ASSERT_TRUE(node.ok());
  EXPECT_EQ((*node)->Stats().sequences, 1u);
  auto again = (*node)->CreateSequence("t", "kept", SmallProfile(), v1::KvstarConfig());
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
}

TEST_F(StorageNodeTest, EachTenantCountsOnlyItsOwnSequencesAndCalls) {
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("alpha", "a1", 1));
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("alpha", "a2", 2));
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("beta", "b1", 3));
  ASSERT_TRUE(node_->Seal("beta", SealRequest("b1")).ok());
  size_t replies = 0;
  ASSERT_TRUE(node_
                  ->GetBlocks("beta", "b1", {},
                              [&](std::vector<storage::BlockData>& batch) {
                                replies += batch.size();
                                return true;
                              })
                  .ok());
  const NodeStats alpha = node_->TenantStats("alpha");
  EXPECT_EQ(alpha.sequences, 2u);
  EXPECT_EQ(alpha.blocks_put, 2u * kLayers * kBlocks);
  EXPECT_EQ(alpha.blocks_got, 0u);
  EXPECT_EQ(alpha.blocks_scored, 0u);
  EXPECT_TRUE(alpha.tiers.empty());
  const NodeStats beta = node_->TenantStats("beta");
  EXPECT_EQ(beta.sequences, 1u);
  EXPECT_EQ(beta.blocks_put, kLayers * kBlocks);
  EXPECT_EQ(beta.blocks_got, replies);
  EXPECT_EQ(beta.blocks_scored, kLayers * kBlocks);
  const NodeStats nobody = node_->TenantStats("gamma");
  EXPECT_EQ(nobody.sequences, 0u);
  EXPECT_EQ(nobody.blocks_put, 0u);
  const NodeStats node = node_->Stats();
  EXPECT_EQ(node.sequences, 3u);
  EXPECT_EQ(node.blocks_put, 3u * kLayers * kBlocks);
  EXPECT_FALSE(node.tiers.empty());
  EXPECT_EQ(node_->SequencesPerTenant(),
            (std::map<std::string, uint64_t>{{"alpha", 2}, {"beta", 1}}));
}

TEST_F(StorageNodeTest, ListAndDescribeShowOnlyTheTenantsSequences) {
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("alpha", "z-last", 1));
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("alpha", "a-first", 2));
  ASSERT_NO_FATAL_FAILURE(CreateAndPut("beta", "secret", 3));
  ASSERT_TRUE(node_->Seal("alpha", SealRequest("a-first")).ok());
  const std::vector<SequenceInfo> listed = node_->ListSequences("alpha");
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].sequence_id, "a-first");
  EXPECT_TRUE(listed[0].sealed);
  EXPECT_EQ(listed[0].sealed_blocks, kBlocks);
  EXPECT_EQ(listed[1].sequence_id, "z-last");
  EXPECT_FALSE(listed[1].sealed);
  EXPECT_EQ(listed[1].profile.num_layers(), kLayers);
  EXPECT_TRUE(listed[1].blocks_per_layer.empty());  // no store reads for a list
  absl::StatusOr<SequenceInfo> described = node_->DescribeSequence("alpha", "z-last");
  ASSERT_TRUE(described.ok()) << described.status();
  EXPECT_EQ(described->blocks_per_layer, std::vector<uint32_t>(kLayers, kBlocks));
  EXPECT_EQ(described->bytes, uint64_t{kLayers} * kBlocks * 2 * KeyBytes());
  EXPECT_GT(described->config.retrieval_stride(), 0u);
  // Another tenant's id is NOT_FOUND, exactly like one that never existed.
  absl::StatusOr<SequenceInfo> other = node_->DescribeSequence("alpha", "secret");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(other.status().message(), "sequence_id secret is not stored");
  ASSERT_TRUE(node_->DropSequence("alpha", "z-last").ok());
  EXPECT_EQ(node_->ListSequences("alpha").size(), 1u);
  EXPECT_EQ(node_->ListSequences("beta").size(), 1u);
}

}  // namespace
}  // namespace kvstar::server
