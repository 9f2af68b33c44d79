// The in-memory backend: the same contract as the durable stores, minus surviving the process.
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "storage/block_store.h"

namespace kvstar::storage {
namespace {

using ::testing::ElementsAre;

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string bytes(n, '\0');
  for (char& c : bytes) c = static_cast<char>(rng());
  return bytes;
}

class MemoryStoreTest : public ::testing::Test {
 protected:
  absl::Status Put(const std::string& seq, BlockId id, const std::string& k, const std::string& v,
                   uint64_t checksum_xor = 0) {
    BlockWrite write{id, k, v, BlockChecksum(k, v) ^ checksum_xor};
    return store_->PutBlocks(seq, {write});
  }

  std::unique_ptr<BlockStore> store_ = NewMemoryStore();
  std::mt19937_64 rng_{5};
};

TEST_F(MemoryStoreTest, PutGetOverwriteListAndDrop) {
  ASSERT_TRUE(store_->PutSequence("s", "meta").ok());
  const std::string k1 = RandomBytes(rng_, 1000), v1 = RandomBytes(rng_, 1000);
  const std::string k2 = RandomBytes(rng_, 1000), v2 = RandomBytes(rng_, 1000);
  ASSERT_TRUE(Put("s", {1, 4}, k1, v1).ok());
  ASSERT_TRUE(Put("s", {0, 9}, k2, v2).ok());
  ASSERT_TRUE(Put("s", {1, 4}, k2, v1).ok());  // overwrite

  std::vector<BlockData> out;
  ASSERT_TRUE(store_->GetBlocks("s", {BlockId{1, 4}, BlockId{0, 9}}, &out).ok());
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].key, k2);
  EXPECT_EQ(out[0].value, v1);
  EXPECT_EQ(out[1].key, k2);
  EXPECT_EQ(out[1].value, v2);
  EXPECT_THAT(*store_->ListBlocks("s"), ElementsAre(BlockId{0, 9}, BlockId{1, 4}));
  EXPECT_EQ(store_->Stats()[0].blocks, 2u);
  EXPECT_EQ(store_->Stats()[0].bytes, 4000u);

  absl::StatusOr<DropResult> dropped = store_->DropSequence("s");
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(dropped->blocks, 2u);
  EXPECT_EQ(dropped->bytes, 4000u);
  EXPECT_TRUE(absl::IsNotFound(store_->GetSequence("s").status()));
  EXPECT_EQ(store_->Stats()[0].bytes, 0u);
}

TEST_F(MemoryStoreTest, BadWritesAndUnknownIdsChangeNothing) {
  ASSERT_TRUE(store_->PutSequence("s", "meta").ok());
  const std::string k = RandomBytes(rng_, 64), v = RandomBytes(rng_, 64);
  EXPECT_TRUE(absl::IsInvalidArgument(Put("s", {0, 0}, k, v, /*checksum_xor=*/1)));
  EXPECT_TRUE(absl::IsNotFound(Put("other", {0, 0}, k, v)));
  EXPECT_TRUE(absl::IsInvalidArgument(store_->PutSequence("", "x")));
  std::vector<BlockData> out;
  EXPECT_TRUE(absl::IsNotFound(store_->GetBlocks("s", {BlockId{0, 0}}, &out)));
  EXPECT_TRUE(absl::IsNotFound(store_->DropSequence("other").status()));
  EXPECT_TRUE(store_->ListBlocks("s")->empty());
}

TEST_F(MemoryStoreTest, ReadBlocksSharesTheStoredCopiesWhichOutliveOverwriteAndDrop) {
  ASSERT_TRUE(store_->PutSequence("s", "meta").ok());
  const std::string k1 = RandomBytes(rng_, 512), v1 = RandomBytes(rng_, 512);
  const std::string k2 = RandomBytes(rng_, 512), v2 = RandomBytes(rng_, 512);
  ASSERT_TRUE(Put("s", {0, 0}, k1, v1).ok());
  ASSERT_TRUE(Put("s", {0, 1}, k2, v2).ok());

  std::vector<SharedBlockData> first, again;
  ASSERT_TRUE(store_->ReadBlocks("s", {BlockId{0, 1}, BlockId{0, 0}}, &first).ok());
  ASSERT_TRUE(store_->ReadBlocks("s", {BlockId{0, 0}}, &again).ok());
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0]->key, k2);
  EXPECT_EQ(first[1]->value, v1);
  EXPECT_EQ(first[1]->checksum, BlockChecksum(k1, v1));
  EXPECT_EQ(first[1].get(), again[0].get()) << "the store's copy, not a new one";

  ASSERT_TRUE(Put("s", {0, 0}, k2, v2).ok());  // overwrite: a new copy is published
  ASSERT_TRUE(store_->DropSequence("s").ok());
  EXPECT_EQ(first[1]->key, k1) << "a held block keeps its bytes";
  EXPECT_EQ(first[0]->value, v2);

  std::vector<SharedBlockData> out;
  EXPECT_TRUE(absl::IsNotFound(store_->ReadBlocks("s", {BlockId{0, 0}}, &out)));
  ASSERT_TRUE(store_->PutSequence("t", "meta").ok());
  const absl::Status missing = store_->ReadBlocks("t", {BlockId{2, 3}}, &out);
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
  EXPECT_THAT(std::string(missing.message()), ::testing::HasSubstr("layer 2, index 3"));
}

}  // namespace
}  // namespace kvstar::storage
