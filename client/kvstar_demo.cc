// kvstar_demo: stores one sequence's KV cache in a running storage node, reads it back and checks
// every byte, seals it and runs one retrieval (which blocks each layer should keep on the GPU),
// shows the node's stats and drops the sequence. Exits non-zero on any mismatch or error.
//
//   kvstar_demo --server=127.0.0.1:50051 [--layers=28 --kv_heads=4 --head_dim=128 --tokens=4096]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "Storage node address.");
ABSL_FLAG(std::string, sequence_id, "demo-sequence", "Id of the sequence to store.");
ABSL_FLAG(uint32_t, layers, 28, "Layers of the model.");
ABSL_FLAG(uint32_t, q_heads, 28, "Query heads per layer.");
ABSL_FLAG(uint32_t, kv_heads, 4, "KV heads per layer.");
ABSL_FLAG(uint32_t, head_dim, 128, "Channels per head.");
ABSL_FLAG(uint32_t, tokens, 4096, "Tokens of KV cache to store (a multiple of 128).");
ABSL_FLAG(bool, keep, false, "Keep the sequence instead of dropping it at the end.");

namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int Fail(const char* what, const grpc::Status& status) {
  std::fprintf(stderr, "FAILED %s: %s (code %d)\n", what, status.error_message().c_str(),
               static_cast<int>(status.error_code()));
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string id = absl::GetFlag(FLAGS_sequence_id);
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials());
  auto stub = kvstar::v1::KvStore::NewStub(channel);

  kvstar::v1::CreateSequenceRequest create;
  create.set_sequence_id(id);
  kvstar::v1::ModelProfile* profile = create.mutable_profile();
  profile->set_num_layers(absl::GetFlag(FLAGS_layers));
  profile->set_num_q_heads(absl::GetFlag(FLAGS_q_heads));
  profile->set_num_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  profile->set_head_dim(absl::GetFlag(FLAGS_head_dim));
  profile->set_block_size(128);
  profile->set_dtype(kvstar::v1::DTYPE_BF16);
  kvstar::v1::CreateSequenceResponse created;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    context.set_wait_for_ready(true);
    grpc::Status status = stub->CreateSequence(&context, create, &created);
    if (!status.ok()) return Fail("CreateSequence", status);
  }
  const uint32_t blocks_per_layer = absl::GetFlag(FLAGS_tokens) / 128;
  const uint64_t key_bytes = uint64_t{128} * profile->num_kv_heads() * profile->head_dim() * 2;
  const uint64_t total_blocks = uint64_t{profile->num_layers()} * blocks_per_layer;
  std::printf("created sequence %s: %s\n  knobs: %s\n", id.c_str(),
              created.profile().ShortDebugString().c_str(),
              created.config().ShortDebugString().c_str());

  // Blocks are made before the clock starts and checked after it stops: the timings are the
  // node's, not this program's.
  std::vector<kvstar::v1::PutBlocksRequest> messages(profile->num_layers());
  for (uint32_t layer = 0; layer < profile->num_layers(); ++layer) {
    messages[layer].set_sequence_id(id);
    for (uint32_t index = 0; index < blocks_per_layer; ++index) {
      *messages[layer].add_blocks() = kvstar::testing::MakeBf16Block(1, layer, index, key_bytes);
    }
  }
  auto start = Clock::now();
  kvstar::v1::PutBlocksResponse put;
  {
    grpc::ClientContext context;
    auto writer = stub->PutBlocks(&context, &put);
    for (const auto& message : messages) {
      if (!writer->Write(message)) break;
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (!status.ok()) return Fail("PutBlocks", status);
  }
  double put_s = SecondsSince(start);
  std::printf("PutBlocks: %llu blocks, %.1f MiB in %.2f s (%.2f GB/s, durable on return)\n",
              static_cast<unsigned long long>(put.blocks_written()),
              put.bytes_written() / 1048576.0, put_s, put.bytes_written() / put_s / 1e9);

  start = Clock::now();
  std::vector<kvstar::v1::GetBlocksResponse> replies;
  {
    grpc::ClientContext context;
    kvstar::v1::GetBlocksRequest request;
    request.set_sequence_id(id);
    auto reader = stub->GetBlocks(&context, request);
    kvstar::v1::GetBlocksResponse reply;
    while (reader->Read(&reply)) replies.push_back(std::move(reply));
    grpc::Status status = reader->Finish();
    if (!status.ok()) return Fail("GetBlocks", status);
  }
  double get_s = SecondsSince(start);
  uint64_t checked = 0;
  for (const auto& reply : replies) {
    for (const kvstar::v1::Block& block : reply.blocks()) {
      const kvstar::v1::Block& expected = messages[block.layer()].blocks(block.block_index());
      if (block.key() != expected.key() || block.value() != expected.value() ||
          block.checksum() != expected.checksum()) {
        std::fprintf(stderr, "FAILED: layer %u block %u differs from what was stored\n",
                     block.layer(), block.block_index());
        return 1;
      }
      ++checked;
    }
  }
  replies.clear();
  if (checked != total_blocks) {
    std::fprintf(stderr, "FAILED: read %llu blocks, stored %llu\n",
                 static_cast<unsigned long long>(checked),
                 static_cast<unsigned long long>(total_blocks));
    return 1;
  }
  std::printf("GetBlocks: %llu blocks read back bit-exact in %.2f s (%.2f GB/s)\n",
              static_cast<unsigned long long>(checked), get_s, put.bytes_written() / get_s / 1e9);

  // Seal with the last prompt queries of every layer, then one decode-time retrieval. The queries
  // here are noise; a real engine sends its model's queries.
  const uint32_t stride = created.config().retrieval_stride();
  const uint64_t query_bytes = uint64_t{stride} * profile->num_q_heads() * profile->head_dim() * 2;
  auto add_queries = [&](uint64_t seed, auto* queries) {
    for (uint32_t layer = 0; layer < profile->num_layers(); ++layer) {
      kvstar::v1::LayerQueries* q = queries->Add();
      q->set_layer(layer);
      q->set_num_queries(stride);
      q->mutable_queries()->resize(query_bytes);
      kvstar::testing::FillBf16Normal(seed * 1000 + layer, q->mutable_queries());
    }
  };
  std::vector<std::vector<uint32_t>> held(profile->num_layers());
  {
    start = Clock::now();
    grpc::ClientContext context;
    kvstar::v1::SealRequest seal;
    seal.set_sequence_id(id);
    add_queries(1, seal.mutable_queries());
    kvstar::v1::SealResponse sealed;
    grpc::Status status = stub->Seal(&context, seal, &sealed);
    if (!status.ok()) return Fail("Seal", status);
    for (const auto& selection : sealed.selections()) {
      held[selection.layer()].assign(selection.block_indices().begin(),
                                     selection.block_indices().end());
    }
    std::printf("Seal: %u blocks per layer in %.2f s; layer 0 keeps %zu blocks on the GPU:",
                sealed.num_blocks(), SecondsSince(start), held[0].size());
    for (uint32_t b : held[0]) std::printf(" %u", b);
    std::printf("\n");
  }
  {
    start = Clock::now();
    grpc::ClientContext context;
    kvstar::v1::RetrieveRequest request;
    kvstar::v1::SequenceQueries* part = request.add_sequences();
    part->set_sequence_id(id);
    part->set_decode_step(stride);
    part->set_include_data(true);
    add_queries(2, part->mutable_queries());
    for (uint32_t layer = 0; layer < profile->num_layers(); ++layer) {
      kvstar::v1::HeldBlocks* h = part->add_held();
      h->set_layer(layer);
      h->mutable_block_indices()->Add(held[layer].begin(), held[layer].end());
    }
    auto reader = stub->Retrieve(&context, request);
    kvstar::v1::RetrieveResponse reply;
    uint64_t replies = 0, selected = 0, sent = 0;
    while (reader->Read(&reply)) {
      ++replies;
      if (!reply.more()) selected += reply.selection().block_indices_size();
      sent += reply.new_blocks_size();
    }
    grpc::Status status = reader->Finish();
    if (!status.ok()) return Fail("Retrieve", status);
    std::printf(
        "Retrieve (step %u, all %u layers): %llu replies in %.1f ms; %llu blocks "
        "selected, %llu sent, the rest already held\n",
        stride, profile->num_layers(), static_cast<unsigned long long>(replies),
        SecondsSince(start) * 1e3, static_cast<unsigned long long>(selected),
        static_cast<unsigned long long>(sent));
  }

  {
    grpc::ClientContext context;
    kvstar::v1::StatsResponse stats;
    grpc::Status status = stub->Stats(&context, kvstar::v1::StatsRequest(), &stats);
    if (!status.ok()) return Fail("Stats", status);
    std::printf(
        "Stats: %llu sequences, %llu retrievals, %llu blocks scored, %llu sent, %llu "
        "skipped as held\n",
        static_cast<unsigned long long>(stats.sequences()),
        static_cast<unsigned long long>(stats.retrievals()),
        static_cast<unsigned long long>(stats.blocks_scored()),
        static_cast<unsigned long long>(stats.blocks_sent()),
        static_cast<unsigned long long>(stats.blocks_skipped_held()));
    for (const auto& tier : stats.tiers()) {
      std::printf("  tier %-8s %8llu blocks %10.1f MiB  hits %llu misses %llu evictions %llu\n",
                  tier.name().c_str(), static_cast<unsigned long long>(tier.blocks()),
                  tier.bytes() / 1048576.0, static_cast<unsigned long long>(tier.hits()),
                  static_cast<unsigned long long>(tier.misses()),
                  static_cast<unsigned long long>(tier.evictions()));
    }
  }

  if (!absl::GetFlag(FLAGS_keep)) {
    grpc::ClientContext context;
    kvstar::v1::DropSequenceRequest request;
    request.set_sequence_id(id);
    kvstar::v1::DropSequenceResponse dropped;
    grpc::Status status = stub->DropSequence(&context, request, &dropped);
    if (!status.ok()) return Fail("DropSequence", status);
    std::printf("DropSequence: %llu blocks, %.1f MiB removed\n",
                static_cast<unsigned long long>(dropped.blocks_dropped()),
                dropped.bytes_dropped() / 1048576.0);
  }
  std::printf("demo OK\n");
  return 0;
}
