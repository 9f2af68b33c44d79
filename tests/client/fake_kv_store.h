// FakeKvStore: an in-process KvStore service on a loopback port whose selections are scripted by
// the test, and whose Retrieve replies can be held back, so a test can decide when a selection
// arrives relative to the engine's steps. Blocks are kept in memory as sent.
#ifndef KVSTAR_TESTS_CLIENT_FAKE_KV_STORE_H_
#define KVSTAR_TESTS_CLIENT_FAKE_KV_STORE_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"

namespace kvstar::testing {

class FakeKvStore : public v1::KvStore::Service {
 public:
  // (layer, num_blocks, decode_step) -> the layer's resident set, ascending.
  using Selector = std::function<std::vector<uint32_t>(uint32_t, uint32_t, uint64_t)>;

  FakeKvStore() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    builder.SetMaxReceiveMessageSize(-1);
    server_ = builder.BuildAndStart();
  }
  ~FakeKvStore() override {
    OpenGate();
    server_->Shutdown();
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

  void set_selector(Selector selector) {
    absl::MutexLock lock(&mu_);
    selector_ = std::move(selector);
  }
  // While closed, Retrieve waits before its first reply.
  void CloseGate() {
    absl::MutexLock lock(&mu_);
    gate_open_ = false;
  }
  void OpenGate() {
    absl::MutexLock lock(&mu_);
    gate_open_ = true;
  }
  void FailRetrieveWith(grpc::Status status) {
    absl::MutexLock lock(&mu_);
    retrieve_failure_ = std::move(status);
  }

  // Flips one byte of a stored block's V and keeps its checksum: replies then carry bytes that
  // do not match it, as a damaged or tampered transport would.
  void CorruptStoredBlock(uint32_t layer, uint32_t index) {
    absl::MutexLock lock(&mu_);
    std::string* value = blocks_.at({layer, index}).mutable_value();
    (*value)[value->size() / 2] ^= 0x40;
  }

  uint64_t blocks_put() const {
    absl::MutexLock lock(&mu_);
    return blocks_.size();
  }
  bool has_block(uint32_t layer, uint32_t index) const {
    absl::MutexLock lock(&mu_);
    return blocks_.count({layer, index}) > 0;
  }
  uint64_t blocks_sent() const {
    absl::MutexLock lock(&mu_);
    return blocks_sent_;
  }
  uint64_t retrieves() const {
    absl::MutexLock lock(&mu_);
    return retrieves_;
  }
  // The most sequences one Retrieve carried.
  int max_sequences_per_retrieve() const {
    absl::MutexLock lock(&mu_);
    return max_sequences_per_retrieve_;
  }
  // The held list of `layer` in the last Retrieve.
  std::set<uint32_t> last_held(uint32_t layer) const {
    absl::MutexLock lock(&mu_);
    auto found = last_held_.find(layer);
    return found == last_held_.end() ? std::set<uint32_t>() : found->second;
  }

  grpc::Status CreateSequence(grpc::ServerContext* context,
                              const v1::CreateSequenceRequest* request,
                              v1::CreateSequenceResponse* response) override {
    absl::MutexLock lock(&mu_);
    num_layers_ = request->profile().num_layers();
    auto metadata = context->client_metadata().find("authorization");
    if (metadata != context->client_metadata().end()) {
      authorization_ = std::string(metadata->second.data(), metadata->second.size());
    }
    response->set_created(true);
    return grpc::Status::OK;
  }

  grpc::Status DropSequence(grpc::ServerContext*, const v1::DropSequenceRequest*,
                            v1::DropSequenceResponse*) override {
    return grpc::Status::OK;  // blocks are shared by the test's sequences: keep them
  }

  std::string authorization() const {
    absl::MutexLock lock(&mu_);
    return authorization_;
  }

  grpc::Status PutBlocks(grpc::ServerContext*, grpc::ServerReader<v1::PutBlocksRequest>* reader,
                         v1::PutBlocksResponse* response) override {
    v1::PutBlocksRequest message;
    while (reader->Read(&message)) {
      absl::MutexLock lock(&mu_);
      for (const v1::Block& block : message.blocks()) {
        blocks_[{block.layer(), block.block_index()}] = block;
        response->set_blocks_written(response->blocks_written() + 1);
      }
    }
    return grpc::Status::OK;
  }

  grpc::Status GetBlocks(grpc::ServerContext*, const v1::GetBlocksRequest* request,
                         grpc::ServerWriter<v1::GetBlocksResponse>* writer) override {
    v1::GetBlocksResponse reply;
    reply.set_sequence_id(request->sequence_id());
    {
      absl::MutexLock lock(&mu_);
      for (const v1::BlockRef& ref : request->blocks()) {
        auto found = blocks_.find({ref.layer(), ref.block_index()});
        if (found == blocks_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "block");
        *reply.add_blocks() = found->second;
      }
    }
    writer->Write(reply);
    return grpc::Status::OK;
  }

  grpc::Status Seal(grpc::ServerContext*, const v1::SealRequest* request,
                    v1::SealResponse* response) override {
    absl::MutexLock lock(&mu_);
    const uint32_t num_blocks = BlocksOfLayer(0);
    response->set_num_blocks(num_blocks);
    for (uint32_t layer = 0; layer < num_layers_; ++layer) {
      v1::LayerSelection* selection = response->add_selections();
      selection->set_layer(layer);
      for (uint32_t block : selector_(layer, num_blocks, 0)) selection->add_block_indices(block);
    }
    return grpc::Status::OK;
  }

  // Streams one reply per layer as soon as it is built, like the real server.
  grpc::Status Retrieve(grpc::ServerContext*, const v1::RetrieveRequest* request,
                        grpc::ServerWriter<v1::RetrieveResponse>* writer) override {
    uint32_t num_layers = 0;
    {
      absl::MutexLock lock(&mu_);
      ++retrieves_;
      max_sequences_per_retrieve_ =
          std::max(max_sequences_per_retrieve_, request->sequences_size());
      mu_.Await(absl::Condition(&gate_open_));
      if (!retrieve_failure_.ok()) return retrieve_failure_;
      num_layers = num_layers_;
    }
    for (const v1::SequenceQueries& part : request->sequences()) {
      {
        absl::MutexLock lock(&mu_);
        for (const v1::HeldBlocks& held : part.held()) {
          last_held_[held.layer()] =
              std::set<uint32_t>(held.block_indices().begin(), held.block_indices().end());
        }
      }
      for (uint32_t layer = 0; layer < num_layers; ++layer) {
        v1::RetrieveResponse reply;
        reply.set_sequence_id(part.sequence_id());
        reply.set_decode_step(part.decode_step());
        reply.mutable_selection()->set_layer(layer);
        {
          absl::MutexLock lock(&mu_);
          for (uint32_t block : selector_(layer, BlocksOfLayer(layer), part.decode_step())) {
            reply.mutable_selection()->add_block_indices(block);
            if (last_held_[layer].count(block) == 0) {
              *reply.add_new_blocks() = blocks_[{layer, block}];
              ++blocks_sent_;
            }
          }
        }
        if (!writer->Write(reply)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
      }
    }
    return grpc::Status::OK;
  }

 private:
  uint32_t BlocksOfLayer(uint32_t layer) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    uint32_t count = 0;
    for (const auto& [id, block] : blocks_) count += id.first == layer ? 1 : 0;
    return count;
  }

  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  mutable absl::Mutex mu_;
  uint32_t num_layers_ ABSL_GUARDED_BY(mu_) = 0;
  Selector selector_ ABSL_GUARDED_BY(mu_);
  bool gate_open_ ABSL_GUARDED_BY(mu_) = true;
  grpc::Status retrieve_failure_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<uint32_t, uint32_t>, v1::Block> blocks_ ABSL_GUARDED_BY(mu_);
  std::map<uint32_t, std::set<uint32_t>> last_held_ ABSL_GUARDED_BY(mu_);
  std::string authorization_ ABSL_GUARDED_BY(mu_);
  uint64_t blocks_sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t retrieves_ ABSL_GUARDED_BY(mu_) = 0;
  int max_sequences_per_retrieve_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvstar::testing

#endif  // KVSTAR_TESTS_CLIENT_FAKE_KV_STORE_H_
