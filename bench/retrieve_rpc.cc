#include "bench/retrieve_rpc.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "bench/loopback_server.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "server/kvstore_service.h"
#include "storage/block_store.h"

namespace kvstar::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::Status FromGrpc(const grpc::Status& status, absl::string_view what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

v1::DType ToProto(retrieval::DType dtype) {
  switch (dtype) {
    case retrieval::DType::kFp16:
      return v1::DTYPE_FP16;
    case retrieval::DType::kFp32:
      return v1::DTYPE_FP32;
    case retrieval::DType::kBf16:
      break;
  }
  return v1::DTYPE_BF16;
}

void AddQueries(absl::Span<const std::vector<uint8_t>> queries, uint32_t num_queries,
                google::protobuf::RepeatedPtrField<v1::LayerQueries>* out) {
  for (size_t layer = 0; layer < queries.size(); ++layer) {
    v1::LayerQueries* q = out->Add();
    q->set_layer(layer);
    q->set_num_queries(num_queries);
    q->set_queries(queries[layer].data(), queries[layer].size());
  }
}

}  // namespace

absl::StatusOr<RetrieveRpcResult> MeasureRetrieveRpc(
    const retrieval::ModelShape& shape, const retrieval::Knobs& knobs,
    absl::Span<const absl::Span<const uint8_t>> key_blocks,
    absl::Span<const std::vector<uint8_t>> queries, uint32_t num_queries, uint32_t calls,
    size_t threads) {
  server::ServiceOptions options;
  options.retrieval_threads = threads;
  absl::StatusOr<std::unique_ptr<LoopbackServer>> loopback =
      LoopbackServer::Start(storage::NewMemoryStore(), options);
  if (!loopback.ok()) return loopback.status();
  v1::KvStore::Stub* stub = &(*loopback)->stub();

  {
    grpc::ClientContext context;
    v1::CreateSequenceRequest create;
    create.set_sequence_id("bench");
    v1::ModelProfile* profile = create.mutable_profile();
    profile->set_num_layers(shape.num_layers);
    profile->set_num_q_heads(shape.num_q_heads);
    profile->set_num_kv_heads(shape.num_kv_heads);
    profile->set_head_dim(shape.head_dim);
    profile->set_block_size(shape.block_size);
    profile->set_dtype(ToProto(shape.dtype));
    v1::KvstarConfig* config = create.mutable_config();
    config->set_init_window_sz(knobs.init_window_sz);
    config->set_local_window_sz(knobs.local_window_sz);
    config->set_sparse_ratio(knobs.sparse_ratio);
    config->set_retrieval_stride(knobs.retrieval_stride);
    config->set_blk_repre_dim_prune_ratio(knobs.blk_repre_dim_prune_ratio);
    config->set_blk_repre_inner_token_merge(knobs.blk_repre_inner_token_merge);
    v1::CreateSequenceResponse created;
    if (auto s = FromGrpc(stub->CreateSequence(&context, create, &created), "CreateSequence");
        !s.ok()) {
      return s;
    }
  }

  RetrieveRpcResult result;
  auto start = Clock::now();
  {
    grpc::ClientContext context;
    v1::PutBlocksResponse put;
    auto writer = stub->PutBlocks(&context, &put);
    const size_t per_message = std::max<size_t>(1, (16 << 20) / (2 * shape.key_block_bytes()));
    v1::PutBlocksRequest message;
    for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
      for (uint32_t b = 0; b < key_blocks.size(); ++b) {
        message.set_sequence_id("bench");
        v1::Block* block = message.add_blocks();
        block->set_layer(layer);
        block->set_block_index(b);
        block->set_key(key_blocks[b].data(), key_blocks[b].size());
        block->set_value(key_blocks[b].data(), key_blocks[b].size());
        block->set_checksum(storage::BlockChecksum(block->key(), block->value()));
        if (static_cast<size_t>(message.blocks_size()) == per_message) {
          writer->Write(message);
          message.Clear();
        }
      }
    }
    if (message.blocks_size() > 0) writer->Write(message);
    writer->WritesDone();
    if (auto s = FromGrpc(writer->Finish(), "PutBlocks"); !s.ok()) return s;
  }
  result.put_s = Seconds(start);

  start = Clock::now();
  {
    grpc::ClientContext context;
    v1::SealRequest seal;
    seal.set_sequence_id("bench");
    AddQueries(queries, num_queries, seal.mutable_queries());
    v1::SealResponse sealed;
    if (auto s = FromGrpc(stub->Seal(&context, seal, &sealed), "Seal"); !s.ok()) return s;
  }
  result.seal_s = Seconds(start);

  v1::RetrieveRequest request;
  v1::SequenceQueries* part = request.add_sequences();
  part->set_sequence_id("bench");
  AddQueries(queries, num_queries, part->mutable_queries());
  std::vector<double> times_ms;
  for (uint32_t call = 0; call <= calls; ++call) {
    part->set_decode_step(uint64_t{call + 1} * knobs.retrieval_stride);
    start = Clock::now();
    grpc::ClientContext context;
    auto reader = stub->Retrieve(&context, request);
    v1::RetrieveResponse reply;
    uint32_t layers = 0;
    while (reader->Read(&reply)) ++layers;
    if (auto s = FromGrpc(reader->Finish(), absl::StrCat("Retrieve call ", call, " after ", layers,
                                                         " of ", shape.num_layers, " layers"));
        !s.ok()) {
      return s;
    }
    if (layers != shape.num_layers) {
      return absl::InternalError(
          absl::StrCat("Retrieve answered ", layers, " layers of ", shape.num_layers));
    }
    if (call > 0) times_ms.push_back(Seconds(start) * 1e3);  // call 0 warms up
  }
  std::sort(times_ms.begin(), times_ms.end());
  result.calls = times_ms.size();
  result.p50_ms = times_ms[times_ms.size() / 2];
  result.p99_ms = times_ms[std::min(times_ms.size() - 1, times_ms.size() * 99 / 100)];
  return result;
}

}  // namespace kvstar::bench
