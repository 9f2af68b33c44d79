// Integration tests: the real kvstar_server binary on a loopback port, spoken to over gRPC, on
// both backends.
#include <chrono>
#include <cstdint>
#include <future>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using ::testing::HasSubstr;

// A real model shape: 28 layers, 4 KV heads of dim 128 in bf16 (Qwen2.5-7B-like), 4K tokens.
constexpr uint32_t kLayers = 28;
constexpr uint32_t kKvHeads = 4;
constexpr uint32_t kHeadDim = 128;
constexpr uint32_t kBlockSize = 128;
constexpr uint32_t kTokens = 4096;
constexpr uint32_t kBlocksPerLayer = kTokens / kBlockSize;
constexpr uint64_t kKeyBytes = uint64_t{kBlockSize} * kKvHeads * kHeadDim * 2;
constexpr uint64_t kSeed = 7;

v1::ModelProfile RealProfile() {
  v1::ModelProfile profile;
  profile.set_num_layers(kLayers);
  profile.set_num_q_heads(28);
  profile.set_num_kv_heads(kKvHeads);
  profile.set_head_dim(kHeadDim);
  profile.set_block_size(kBlockSize);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

grpc::Status CreateSequence(v1::KvStore::Stub& stub, const std::string& id,
                            const v1::ModelProfile& profile,
                            v1::CreateSequenceResponse* response = nullptr) {
  grpc::ClientContext context;
  v1::CreateSequenceRequest request;
  request.set_sequence_id(id);
  *request.mutable_profile() = profile;
  v1::CreateSequenceResponse ignored;
  return stub.CreateSequence(&context, request, response != nullptr ? response : &ignored);
}

// Streams the given messages as one PutBlocks call.
grpc::Status PutMessages(v1::KvStore::Stub& stub, const std::vector<v1::PutBlocksRequest>& messages,
                         v1::PutBlocksResponse* response = nullptr) {
  grpc::ClientContext context;
  v1::PutBlocksResponse ignored;
  auto writer = stub.PutBlocks(&context, response != nullptr ? response : &ignored);
  for (const v1::PutBlocksRequest& message : messages) {
    if (!writer->Write(message)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

// Puts every block of the real-shape sequence, 8 blocks (2 MiB) per message.
grpc::Status PutWholeSequence(v1::KvStore::Stub& stub, const std::string& id,
                              v1::PutBlocksResponse* response) {
  grpc::ClientContext context;
  auto writer = stub.PutBlocks(&context, response);
  v1::PutBlocksRequest message;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    for (uint32_t index = 0; index < kBlocksPerLayer; ++index) {
      message.set_sequence_id(id);
      *message.add_blocks() = MakeBlock(kSeed, layer, index, kKeyBytes);
      if (message.blocks_size() == 8) {
        if (!writer->Write(message)) return writer->Finish();
        message.Clear();
      }
    }
  }
  if (message.blocks_size() > 0) writer->Write(message);
  writer->WritesDone();
  return writer->Finish();
}

// Reads blocks back (all when `refs` is empty) and returns them in arrival order.
grpc::Status GetBlocks(v1::KvStore::Stub& stub, const std::string& id,
                       const std::vector<v1::BlockRef>& refs, std::vector<v1::Block>* blocks) {
  grpc::ClientContext context;
  v1::GetBlocksRequest request;
  request.set_sequence_id(id);
  for (const v1::BlockRef& ref : refs) *request.add_blocks() = ref;
  auto reader = stub.GetBlocks(&context, request);
  v1::GetBlocksResponse reply;
  while (reader->Read(&reply)) {
    for (v1::Block& block : *reply.mutable_blocks()) blocks->push_back(std::move(block));
  }
  return reader->Finish();
}

v1::StatsResponse GetStats(v1::KvStore::Stub& stub) {
  grpc::ClientContext context;
  v1::StatsResponse stats;
  EXPECT_TRUE(stub.Stats(&context, v1::StatsRequest(), &stats).ok());
  return stats;
}

// Asks Stats until no tier holds space of a dropped sequence any more (RocksDB reclaims it in
// the background after DropSequence answered; each answer is the event itself, as the reclaim
// thread updates it when a compaction finished). False after 60 s.
bool AwaitDropsReclaimed(v1::KvStore::Stub& stub) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    const v1::StatsResponse stats = GetStats(stub);
    uint64_t pending = 0;
    for (const v1::TierStats& tier : stats.tiers()) pending += tier.reclaim_pending_bytes();
    if (pending == 0) return true;
  }
  return false;
}

// Every block of the sequence came back, in (layer, index) order, bit for bit.
void ExpectWholeSequence(v1::KvStore::Stub& stub, const std::string& id) {
  std::vector<v1::Block> blocks;
  grpc::Status status = GetBlocks(stub, id, {}, &blocks);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(blocks.size(), kLayers * kBlocksPerLayer);
  size_t i = 0;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    for (uint32_t index = 0; index < kBlocksPerLayer; ++index, ++i) {
      const v1::Block expected = MakeBlock(kSeed, layer, index, kKeyBytes);
      ASSERT_EQ(blocks[i].layer(), layer);
      ASSERT_EQ(blocks[i].block_index(), index);
      ASSERT_EQ(blocks[i].checksum(), expected.checksum());
      ASSERT_TRUE(blocks[i].key() == expected.key())
          << "key of layer " << layer << " block " << index;
      ASSERT_TRUE(blocks[i].value() == expected.value())
          << "value of layer " << layer << " block " << index;
    }
  }
}

class ServerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    data_dir_ = MakeTempDir(GetParam());
    ASSERT_FALSE(data_dir_.empty());
    // A DRAM tier smaller than the sequence, so reads are served by both tiers.
    server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
        "--backend=" + GetParam(), "--data_dir=" + data_dir_,
        absl::StrCat("--dram_budget_bytes=", 64 << 20),
        absl::StrCat("--max_message_bytes=", 8 << 20), "--log_level=warn"});
    ASSERT_TRUE(server_->Start().ok());
  }

  std::string data_dir_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_P(ServerTest, StoresA4kTokenSequenceAndReadsItBackAcrossRestartUntilDropped) {
  const uint64_t empty_disk = DiskUsageBytes(data_dir_);
  v1::CreateSequenceResponse created;
  ASSERT_TRUE(CreateSequence(server_->stub(), "doc-1", RealProfile(), &created).ok());
  EXPECT_TRUE(created.created());
  EXPECT_EQ(created.config().retrieval_stride(), 8u);

  v1::PutBlocksResponse put;
  grpc::Status status = PutWholeSequence(server_->stub(), "doc-1", &put);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(put.blocks_written(), kLayers * kBlocksPerLayer);
  EXPECT_EQ(put.bytes_written(), kLayers * kBlocksPerLayer * 2 * kKeyBytes);
  ExpectWholeSequence(server_->stub(), "doc-1");

  const uint64_t stored_disk = DiskUsageBytes(data_dir_);
  EXPECT_GE(stored_disk, empty_disk + put.bytes_written());

  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_TRUE(server_->Start().ok());
  ExpectWholeSequence(server_->stub(), "doc-1");
  v1::StatsResponse stats = GetStats(server_->stub());
  EXPECT_EQ(stats.sequences(), 1u);
  ASSERT_GE(stats.tiers_size(), 2);
  EXPECT_EQ(stats.tiers(0).name(), "dram");
  EXPECT_EQ(stats.tiers(1).name(), GetParam());
  EXPECT_EQ(stats.tiers(1).blocks(), kLayers * kBlocksPerLayer);
  EXPECT_EQ(stats.tiers(1).bytes(), put.bytes_written());

  // Creating it again with the same profile is a no-op.
  ASSERT_TRUE(CreateSequence(server_->stub(), "doc-1", RealProfile(), &created).ok());
  EXPECT_FALSE(created.created());

  grpc::ClientContext context;
  v1::DropSequenceRequest drop;
  drop.set_sequence_id("doc-1");
  v1::DropSequenceResponse dropped;
  ASSERT_TRUE(server_->stub().DropSequence(&context, drop, &dropped).ok());
  EXPECT_EQ(dropped.blocks_dropped(), kLayers * kBlocksPerLayer);

  std::vector<v1::Block> blocks;
  EXPECT_EQ(GetBlocks(server_->stub(), "doc-1", {}, &blocks).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // The bytes left the disk, not just the index.
  ASSERT_TRUE(AwaitDropsReclaimed(server_->stub()));
  EXPECT_LT(DiskUsageBytes(data_dir_), empty_disk + put.bytes_written() / 10);

  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_TRUE(server_->Start().ok());
  EXPECT_EQ(GetStats(server_->stub()).sequences(), 0u);
  EXPECT_EQ(GetBlocks(server_->stub(), "doc-1", {}, &blocks).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_P(ServerTest, AcknowledgedBlocksSurviveKill9) {
  ASSERT_TRUE(CreateSequence(server_->stub(), "crash", RealProfile()).ok());
  v1::PutBlocksRequest message;
  message.set_sequence_id("crash");
  for (uint32_t index = 0; index < 4; ++index) {
    *message.add_blocks() = MakeBlock(kSeed, 3, index, kKeyBytes);
  }
  ASSERT_TRUE(PutMessages(server_->stub(), {message}).ok());
  server_->Kill();
  ASSERT_TRUE(server_->Start().ok());
  std::vector<v1::Block> blocks;
  ASSERT_TRUE(GetBlocks(server_->stub(), "crash", {}, &blocks).ok());
  ASSERT_EQ(blocks.size(), 4u);
  for (uint32_t index = 0; index < 4; ++index) {
    EXPECT_EQ(blocks[index].checksum(), MakeBlock(kSeed, 3, index, kKeyBytes).checksum());
  }
}

// A bad request gets its status code, a message naming the problem, and changes nothing.
struct BadRequest {
  std::string name;
  grpc::StatusCode code;
  std::string message_part;
  std::function<grpc::Status(v1::KvStore::Stub&)> call;
};

v1::PutBlocksRequest PutOf(const std::string& id, std::vector<v1::Block> blocks) {
  v1::PutBlocksRequest message;
  message.set_sequence_id(id);
  for (v1::Block& block : blocks) *message.add_blocks() = std::move(block);
  return message;
}

std::vector<BadRequest> BadRequests() {
  const v1::ModelProfile good = RealProfile();
  auto with = [&](auto&& change) {
    v1::ModelProfile p = good;
    change(p);
    return p;
  };
  auto create = [](v1::ModelProfile profile, std::string id = "bad") {
    return [profile, id](v1::KvStore::Stub& stub) { return CreateSequence(stub, id, profile); };
  };
  auto put = [](std::vector<v1::PutBlocksRequest> messages) {
    return [messages](v1::KvStore::Stub& stub) { return PutMessages(stub, messages); };
  };
  auto get = [](std::string id, std::vector<v1::BlockRef> refs) {
    return [id, refs](v1::KvStore::Stub& stub) {
      std::vector<v1::Block> blocks;
      return GetBlocks(stub, id, refs, &blocks);
    };
  };
  auto ref = [](uint32_t layer, uint32_t index) {
    v1::BlockRef r;
    r.set_layer(layer);
    r.set_block_index(index);
    return r;
  };
  v1::Block bad_checksum = MakeBlock(kSeed, 0, 1, kKeyBytes);
  bad_checksum.set_checksum(bad_checksum.checksum() ^ 1);
  v1::Block short_key = MakeBlock(kSeed, 0, 1, kKeyBytes);
  short_key.mutable_key()->resize(kKeyBytes - 2);
  v1::Block big = MakeBlock(kSeed, 0, 1, kKeyBytes);
  big.mutable_value()->append(9 << 20, 'x');

  return {
      {"empty sequence id", grpc::StatusCode::INVALID_ARGUMENT, "sequence_id is empty",
       create(good, "")},
      {"sequence id too long", grpc::StatusCode::INVALID_ARGUMENT, "sequence_id is 300 bytes",
       create(good, std::string(300, 'a'))},
      {"no dtype", grpc::StatusCode::INVALID_ARGUMENT, "profile.dtype",
       create(with([](auto& p) { p.set_dtype(v1::DTYPE_UNSPECIFIED); }))},
      {"unknown dtype", grpc::StatusCode::INVALID_ARGUMENT, "profile.dtype is 17 (unknown)",
       create(with([](auto& p) { p.set_dtype(static_cast<v1::DType>(17)); }))},
      {"one block would be 512 GiB", grpc::StatusCode::INVALID_ARGUMENT,
       "one block is 549755813888 bytes", create(with([](auto& p) {
         p.set_num_q_heads(1024);
         p.set_num_kv_heads(1024);
         p.set_head_dim(1024);
         p.set_block_size(65536);
         p.set_dtype(v1::DTYPE_FP32);
       }))},
      {"sequence id with a newline", grpc::StatusCode::INVALID_ARGUMENT,
       R"(sequence_id "a\n[info] forged" holds control character 0x0a)",
       create(good, "a\n[info] forged")},
      {"get with a newline in the id", grpc::StatusCode::INVALID_ARGUMENT,
       "holds control character", get("seq\n", {ref(0, 0)})},
      {"q heads not a multiple of kv heads", grpc::StatusCode::INVALID_ARGUMENT,
       "not a multiple of profile.num_kv_heads",
       create(with([](auto& p) { p.set_num_q_heads(30); }))},
      {"zero layers", grpc::StatusCode::INVALID_ARGUMENT, "profile.num_layers is 0",
       create(with([](auto& p) { p.set_num_layers(0); }))},
      {"profile differs from the stored one", grpc::StatusCode::ALREADY_EXISTS, "different profile",
       create(with([](auto& p) { p.set_head_dim(64); }), "seq")},
      {"merge that does not divide the block size", grpc::StatusCode::INVALID_ARGUMENT,
       "blk_repre_inner_token_merge = 3",
       [good](v1::KvStore::Stub& stub) {
         grpc::ClientContext context;
         v1::CreateSequenceRequest request;
         request.set_sequence_id("merge");
         *request.mutable_profile() = good;
         request.mutable_config()->set_blk_repre_inner_token_merge(3);
         v1::CreateSequenceResponse response;
         return stub.CreateSequence(&context, request, &response);
       }},
      {"put to an unknown sequence", grpc::StatusCode::NOT_FOUND, "sequence_id nope is not stored",
       put({PutOf("nope", {MakeBlock(kSeed, 0, 1, kKeyBytes)})})},
      {"wrong checksum, after a good block in the same message", grpc::StatusCode::INVALID_ARGUMENT,
       "checksum", put({PutOf("seq", {MakeBlock(kSeed, 0, 2, kKeyBytes), bad_checksum})})},
      {"key size does not match the profile", grpc::StatusCode::INVALID_ARGUMENT,
       "key is 131070 bytes", put({PutOf("seq", {short_key})})},
      {"layer out of range", grpc::StatusCode::INVALID_ARGUMENT, "layer is 28",
       put({PutOf("seq", {MakeBlock(kSeed, 28, 1, kKeyBytes)})})},
      {"block index out of range", grpc::StatusCode::INVALID_ARGUMENT, "block_index is 4294967295",
       put({PutOf("seq", {MakeBlock(kSeed, 0, 0xFFFFFFFFu, kKeyBytes)})})},
      {"message over the size limit", grpc::StatusCode::RESOURCE_EXHAUSTED, "",
       put({PutOf("seq", {big})})},
      {"get from an unknown sequence", grpc::StatusCode::NOT_FOUND, "nope",
       get("nope", {ref(0, 0)})},
      {"get a layer out of range", grpc::StatusCode::INVALID_ARGUMENT, "layer is 99",
       get("seq", {ref(99, 0)})},
      {"get a block never stored", grpc::StatusCode::NOT_FOUND, "", get("seq", {ref(0, 17)})},
      {"drop an unknown sequence", grpc::StatusCode::NOT_FOUND, "nope",
       [](v1::KvStore::Stub& stub) {
         grpc::ClientContext context;
         v1::DropSequenceRequest request;
         request.set_sequence_id("nope");
         v1::DropSequenceResponse response;
         return stub.DropSequence(&context, request, &response);
       }},
  };
}

TEST_P(ServerTest, BadRequestsGetTheirStatusAndChangeNothing) {
  ASSERT_TRUE(CreateSequence(server_->stub(), "seq", RealProfile()).ok());
  const v1::Block stored = MakeBlock(kSeed, 0, 0, kKeyBytes);
  ASSERT_TRUE(PutMessages(server_->stub(), {PutOf("seq", {stored})}).ok());
  const v1::StatsResponse before = GetStats(server_->stub());

  for (const BadRequest& bad : BadRequests()) {
    SCOPED_TRACE(bad.name);
    grpc::Status status = bad.call(server_->stub());
    EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(bad.message_part));
  }

  const v1::StatsResponse after = GetStats(server_->stub());
  EXPECT_EQ(after.sequences(), before.sequences());
  EXPECT_EQ(after.tiers(1).blocks(), before.tiers(1).blocks());
  EXPECT_EQ(after.tiers(1).bytes(), before.tiers(1).bytes());
  std::vector<v1::Block> blocks;
  ASSERT_TRUE(GetBlocks(server_->stub(), "seq", {}, &blocks).ok());
  ASSERT_EQ(blocks.size(), 1u);
  EXPECT_TRUE(blocks[0].key() == stored.key() && blocks[0].value() == stored.value());
  // The server is still serving after all of them.
  EXPECT_EQ(GetStats(server_->stub()).sequences(), 1u);
}

// One raw request message to a streaming method, through the generic stub; its status.
class RawStreamingCall : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RawStreamingCall(grpc::GenericStub* stub, const std::string& method, const std::string& bytes) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bytes);
    request_ = grpc::ByteBuffer(&slice, 1);
    stub->PrepareBidiStreamingCall(&context_, method, grpc::StubOptions(), this);
    StartWriteLast(&request_, grpc::WriteOptions());
    StartRead(&response_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (ok) StartRead(&response_);
  }
  void OnDone(const grpc::Status& status) override { done_.set_value(status); }
  grpc::Status Await() { return done_.get_future().get(); }

 private:
  grpc::ClientContext context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::promise<grpc::Status> done_;
};

// Bytes that are no kvstar request at all, or a request whose sequence_id is not UTF-8 (protobuf
// rejects it before any handler runs): INVALID_ARGUMENT naming the method and what was wrong,
// nothing stored, and the server goes on serving.
TEST_P(ServerTest, UndecodableRequestsGetInvalidArgumentNamingTheMethod) {
  grpc::GenericStub generic(server_->channel());
  auto call = [&](const std::string& method, const std::string& bytes) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    std::promise<grpc::Status> done;
    generic.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                      [&](grpc::Status status) { done.set_value(std::move(status)); });
    return done.get_future().get();
  };
  // Field 1 (sequence_id), length 2, bytes ff fe.
  const std::string bad_utf8("\x0a\x02\xff\xfe", 4);
  grpc::Status status = call("/kvstar.v1.KvStore/CreateSequence", bad_utf8);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("CreateSequence request could not be decoded as kvstar.v1."
                        "CreateSequenceRequest"));
  EXPECT_THAT(status.error_message(), HasSubstr("not valid UTF-8"));
  // A field tag that ends the buffer halfway: no protobuf message.
  status = call("/kvstar.v1.KvStore/DropSequence", std::string("\x0a\x7f\x01", 3));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("DropSequence request could not be decoded"));
  // Retrieve streams its replies; its request is decoded the same way.
  RawStreamingCall retrieve(&generic, "/kvstar.v1.KvStore/Retrieve",
                            std::string("\x0a\x04\x0a\x02\xff\xfe", 6));
  status = retrieve.Await();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("Retrieve request could not be decoded as kvstar.v1.RetrieveRequest"));
  EXPECT_EQ(GetStats(server_->stub()).sequences(), 0u);
  EXPECT_TRUE(CreateSequence(server_->stub(), "after", RealProfile()).ok());
}

// Raw PutBlocks messages through the generic stub, one after the other; the stream's status.
class RawPutStream : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RawPutStream(grpc::GenericStub* stub, std::vector<std::string> messages) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    for (const std::string& bytes : messages) {
      grpc::Slice slice(bytes);
      messages_.emplace_back(&slice, 1);
    }
    stub->PrepareBidiStreamingCall(&context_, "/kvstar.v1.KvStore/PutBlocks", grpc::StubOptions(),
                                   this);
    WriteNext();
    StartRead(&response_);
    StartCall();
  }
  void OnWriteDone(bool ok) override {
    if (ok) WriteNext();
  }
  void OnReadDone(bool ok) override {
    if (ok) StartRead(&response_);
  }
  void OnDone(const grpc::Status& status) override { done_.set_value(status); }
  grpc::Status Await() { return done_.get_future().get(); }

 private:
  void WriteNext() {
    if (next_ == messages_.size()) return StartWritesDone();
    StartWrite(&messages_[next_++]);
  }

  grpc::ClientContext context_;
  std::vector<grpc::ByteBuffer> messages_;
  size_t next_ = 0;
  grpc::ByteBuffer response_;
  std::promise<grpc::Status> done_;
};

// A PutBlocks message gRPC cannot decode is no half-close: the stream ends INVALID_ARGUMENT
// naming the method, the message and its type; the bad message stores nothing, blocks stored
// before stay, and the server goes on serving.
TEST_P(ServerTest, UndecodablePutBlocksMessageEndsTheStreamWithInvalidArgument) {
  ASSERT_TRUE(CreateSequence(server_->stub(), "s", RealProfile()).ok());
  v1::PutBlocksRequest first;
  first.set_sequence_id("s");
  *first.add_blocks() = MakeBlock(kSeed, 0, 0, kKeyBytes);
  ASSERT_TRUE(PutMessages(server_->stub(), {first}).ok());

  grpc::GenericStub generic(server_->channel());
  v1::PutBlocksRequest good;
  good.set_sequence_id("s");
  *good.add_blocks() = MakeBlock(kSeed, 0, 1, kKeyBytes);
  v1::PutBlocksRequest spoiled;
  spoiled.set_sequence_id("s");
  *spoiled.add_blocks() = MakeBlock(kSeed, 0, 2, kKeyBytes);
  // A whole, valid message, then field 1 (sequence_id) again with the bytes ff fe: protobuf
  // rejects the message for its string that is not UTF-8.
  const std::string bad_utf8 = spoiled.SerializeAsString() + std::string("\x0a\x02\xff\xfe", 4);
  RawPutStream stream(&generic, {good.SerializeAsString(), bad_utf8});
  grpc::Status status = stream.Await();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(),
              HasSubstr("PutBlocks message 1 could not be decoded as kvstar.v1.PutBlocksRequest"));
  EXPECT_THAT(status.error_message(), HasSubstr("not valid UTF-8"));
  // A first message that is no protobuf message: a field tag that ends the buffer halfway.
  RawPutStream garbage(&generic, {std::string("\x0a\x7f\x01", 3)});
  status = garbage.Await();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("PutBlocks message 0 could not be decoded"));

  std::vector<v1::Block> blocks;
  status = GetBlocks(server_->stub(), "s", {}, &blocks);
  ASSERT_TRUE(status.ok()) << status.error_message();
  bool stored_spoiled = false;
  bool stored_first = false;
  for (const v1::Block& block : blocks) {
    stored_spoiled = stored_spoiled || (block.layer() == 0 && block.block_index() == 2);
    stored_first = stored_first || (block.layer() == 0 && block.block_index() == 0 &&
                                    block.key() == first.blocks(0).key() &&
                                    block.value() == first.blocks(0).value());
  }
  EXPECT_TRUE(stored_first);
  EXPECT_FALSE(stored_spoiled);
  // The raw stream still stores and answers like a typed one.
  v1::PutBlocksResponse response;
  ASSERT_TRUE(PutMessages(server_->stub(), {spoiled}, &response).ok());
  EXPECT_EQ(response.blocks_written(), 1u);
  EXPECT_EQ(response.bytes_written(), 2 * kKeyBytes);
}

INSTANTIATE_TEST_SUITE_P(Backends, ServerTest, ::testing::Values("rocksdb", "nfs"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvstar::testing
