#include "kvstar/admin.h"

#include "client/channel.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "kvstar/v1/kvstar.grpc.pb.h"

namespace kvstar {
namespace {

ModelProfile FromProto(const v1::ModelProfile& proto) {
  ModelProfile profile;
  profile.num_layers = proto.num_layers();
  profile.num_q_heads = proto.num_q_heads();
  profile.num_kv_heads = proto.num_kv_heads();
  profile.head_dim = proto.head_dim();
  profile.block_size = proto.block_size();
  profile.dtype = static_cast<DType>(proto.dtype());
  return profile;
}

KvstarConfig FromProto(const v1::KvstarConfig& proto) {
  KvstarConfig config;
  config.init_window_sz = proto.init_window_sz();
  config.local_window_sz = proto.local_window_sz();
  config.sparse_ratio = proto.sparse_ratio();
  config.retrieval_stride = proto.retrieval_stride();
  config.blk_repre_dim_prune_ratio = proto.blk_repre_dim_prune_ratio();
  config.blk_repre_inner_token_merge = proto.blk_repre_inner_token_merge();
  config.block_vote = static_cast<uint32_t>(proto.block_vote());
  config.representation_format = static_cast<uint32_t>(proto.representation_format());
  return config;
}

SequenceDescription FromProto(const v1::SequenceInfo& proto) {
  SequenceDescription sequence;
  sequence.sequence_id = proto.sequence_id();
  sequence.profile = FromProto(proto.profile());
  sequence.config = FromProto(proto.config());
  sequence.sealed = proto.sealed();
  sequence.sealed_blocks = proto.sealed_blocks();
  sequence.blocks_per_layer.assign(proto.blocks_per_layer().begin(),
                                   proto.blocks_per_layer().end());
  sequence.bytes = proto.bytes();
  return sequence;
}

class AdminImpl final : public Admin {
 public:
  explicit AdminImpl(const ClientOptions& options)
      : options_(options),
        channel_(client_internal::MakeChannel(options, options.address)),
        stub_(v1::KvStore::NewStub(channel_)) {}

  absl::StatusOr<std::string> Health() override {
    grpc::ClientContext context;
    client_internal::PrepareContext(options_, &context);
    grpc::health::v1::HealthCheckRequest request;
    request.set_service("kvstar.v1.KvStore");
    grpc::health::v1::HealthCheckResponse response;
    const grpc::internal::RpcMethod method("/grpc.health.v1.Health/Check",
                                           grpc::internal::RpcMethod::NORMAL_RPC);
    grpc::Status status =
        grpc::internal::BlockingUnaryCall(channel_.get(), method, &context, request, &response);
    if (!status.ok()) return client_internal::FromGrpc(status, "Health");
    return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
  }

  absl::StatusOr<NodeStatsInfo> Stats() override {
    v1::StatsResponse response;
    if (absl::Status s = Call(&Stub::Stats, v1::StatsRequest(), &response, "Stats"); !s.ok()) {
      return s;
    }
    NodeStatsInfo stats;
    stats.scope = response.scope();
    stats.sequences = response.sequences();
    for (const v1::TierStats& tier : response.tiers()) {
      stats.tiers.push_back({tier.name(), tier.blocks(), tier.bytes(), tier.budget_bytes(),
                             tier.hits(), tier.misses(), tier.evictions(),
                             tier.reclaim_pending_bytes()});
    }
    stats.blocks_put = response.blocks_put();
    stats.blocks_got = response.blocks_got();
    stats.retrievals = response.retrievals();
    stats.blocks_scored = response.blocks_scored();
    stats.blocks_sent = response.blocks_sent();
    stats.blocks_skipped_held = response.blocks_skipped_held();
    stats.blocks_sent_shared = response.blocks_sent_shared();
    stats.corrupt_blocks = response.corrupt_blocks();
    stats.retrieve_micros = response.retrieve_micros();
    stats.retrieve_score_micros = response.retrieve_score_micros();
    stats.retrieve_wait_micros = response.retrieve_wait_micros();
    stats.retrieve_read_micros = response.retrieve_read_micros();
    stats.retrieve_copy_micros = response.retrieve_copy_micros();
    stats.retrieve_send_micros = response.retrieve_send_micros();
    return stats;
  }

  absl::StatusOr<std::vector<SequenceDescription>> ListSequences() override {
    v1::ListSequencesResponse response;
    if (absl::Status s =
            Call(&Stub::ListSequences, v1::ListSequencesRequest(), &response, "ListSequences");
        !s.ok()) {
      return s;
    }
    std::vector<SequenceDescription> sequences;
    for (const v1::SequenceInfo& info : response.sequences()) sequences.push_back(FromProto(info));
    return sequences;
  }

  absl::StatusOr<SequenceDescription> DescribeSequence(const std::string& sequence_id) override {
    v1::DescribeSequenceRequest request;
    request.set_sequence_id(sequence_id);
    v1::DescribeSequenceResponse response;
    if (absl::Status s = Call(&Stub::DescribeSequence, request, &response, "DescribeSequence");
        !s.ok()) {
      return s;
    }
    return FromProto(response.sequence());
  }

  absl::StatusOr<uint64_t> DropSequence(const std::string& sequence_id) override {
    v1::DropSequenceRequest request;
    request.set_sequence_id(sequence_id);
    v1::DropSequenceResponse response;
    if (absl::Status s = Call(&Stub::DropSequence, request, &response, "DropSequence"); !s.ok()) {
      return s;
    }
    return response.blocks_dropped();
  }

 private:
  using Stub = v1::KvStore::Stub;

  // One unary call with the options' deadline and token; gRPC errors keep their code.
  template <typename Request, typename Response>
  absl::Status Call(grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
                    const Request& request, Response* response, const char* what) {
    grpc::ClientContext context;
    client_internal::PrepareContext(options_, &context);
    return client_internal::FromGrpc((stub_.get()->*method)(&context, request, response), what);
  }

  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::KvStore::Stub> stub_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Admin>> Admin::Connect(const ClientOptions& options) {
  if (absl::Status tls = client_internal::CheckTlsOptions(options); !tls.ok()) return tls;
  return std::unique_ptr<Admin>(new AdminImpl(options));
}

}  // namespace kvstar
