#include "server/metrics.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/message.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/interceptor.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "spdlog/spdlog.h"
#include "storage/log_value.h"

namespace kvstar::server {
namespace {

// "/kvstar.v1.KvStore/Retrieve" -> "Retrieve"; other services keep their full name.
std::string ShortMethod(const char* method) {
  std::string name = method != nullptr ? method : "";
  constexpr char kPrefix[] = "/kvstar.v1.KvStore/";
  if (name.rfind(kPrefix, 0) == 0) return name.substr(sizeof(kPrefix) - 1);
  return name;
}

// gRPC's status codes are absl's, number for number.
std::string CodeName(int code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

// The request type's "sequence_id" field when it has a singular string one, else null.
const google::protobuf::FieldDescriptor* SequenceIdField(
    const google::protobuf::Descriptor* request_type) {
  const google::protobuf::FieldDescriptor* field = request_type->FindFieldByName("sequence_id");
  if (field == nullptr || field->type() != google::protobuf::FieldDescriptor::TYPE_STRING ||
      field->is_repeated()) {
    return nullptr;
  }
  return field;
}

// The value of the top-level length-delimited field `number` in a serialized message (its last
// occurrence, as a parse would keep), found by skipping the other fields: block bytes are
// neither parsed nor copied. Empty when the message has none or ends first.
std::string TopLevelBytesField(grpc::ByteBuffer* serialized, int number) {
  using google::protobuf::internal::WireFormatLite;
  grpc::ProtoBufferReader reader(serialized);
  google::protobuf::io::CodedInputStream input(&reader);
  std::string value;
  while (const uint32_t tag = input.ReadTag()) {
    if (WireFormatLite::GetTagFieldNumber(tag) == number &&
        WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadBytes(&input, &value)) return std::string();
    } else if (!WireFormatLite::SkipField(&input, tag)) {
      break;
    }
  }
  return value;
}

// Records one RPC: started when gRPC creates it, finished when its status is sent (or, for an
// RPC that ends without sending one, when gRPC destroys it: counted as CANCELLED). It also tags
// the RPC with a request id, sent to the client as "kvstar-request-id" initial metadata, and
// writes the RPC's log line when it ends.
class RpcInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcInterceptor(Metrics* metrics, std::string method, bool kvstar_method, bool raw,
                 uint64_t request_id, std::string peer)
      : metrics_(metrics),
        method_(std::move(method)),
        kvstar_method_(kvstar_method),
        raw_(raw),
        request_id_(request_id),
        peer_(std::move(peer)),
        start_(std::chrono::steady_clock::now()) {
    metrics_->RpcStarted(method_);
  }
  ~RpcInterceptor() override {
    bool finished;
    {
      absl::MutexLock lock(&mu_);
      finished = finished_;
    }
    if (!finished) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "ended without a status"));
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("kvstar-request-id", absl::StrCat(request_id_));
    }
    // Only kvstar's own methods carry kvstar messages here: protobuf messages, or for the
    // methods registered raw their serialized bytes. The health service's are byte buffers.
    // A stream's received messages and its status may be intercepted on different threads.
    bool want_sequence_id;
    {
      absl::MutexLock lock(&mu_);
      want_sequence_id = sequence_id_.empty();
    }
    if (kvstar_method_ && want_sequence_id &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      // Every kvstar request but Retrieve's batch names one sequence; the log line names it.
      void* received = methods->GetRecvMessage();
      // No message where one was due: gRPC could not decode the request. (A client stream's
      // end looks the same; only a status gRPC itself left empty is replaced below.)
      std::string sequence_id;
      if (received != nullptr && raw_) {
        const google::protobuf::MethodDescriptor* method = KvStoreMethod();
        const google::protobuf::FieldDescriptor* field =
            method != nullptr ? SequenceIdField(method->input_type()) : nullptr;
        if (field != nullptr) {
          sequence_id =
              TopLevelBytesField(static_cast<grpc::ByteBuffer*>(received), field->number());
        }
      } else if (received != nullptr) {
        const auto* message = static_cast<const google::protobuf::Message*>(received);
        const google::protobuf::FieldDescriptor* field = SequenceIdField(message->GetDescriptor());
        if (field != nullptr) sequence_id = message->GetReflection()->GetString(*message, field);
      }
      absl::MutexLock lock(&mu_);
      if (received == nullptr) received_nothing_ = true;
      if (sequence_id_.empty()) sequence_id_ = std::move(sequence_id);
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::Status status = methods->GetSendStatus();
      bool received_nothing;
      {
        absl::MutexLock lock(&mu_);
        received_nothing = received_nothing_;
      }
      if (received_nothing && !status.ok() && status.error_message().empty()) {
        // gRPC answers a request it cannot decode with an empty UNIMPLEMENTED before any handler
        // runs; say what was wrong instead.
        status = UndecodableRequest();
        methods->ModifySendStatus(status);
      }
      Finish(status);
    }
    methods->Proceed();
  }

 private:
  void Finish(const grpc::Status& status) {
    std::string sequence_id;
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;
      sequence_id = sequence_id_;
    }
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start_;
    metrics_->RpcFinished(method_, status.error_code(), elapsed.count());
    // Successful calls log at debug (a decoding engine makes many); failures at info, and
    // server-side faults at warn.
    const grpc::StatusCode code = status.error_code();
    const spdlog::level::level_enum level =
        code == grpc::StatusCode::OK ? spdlog::level::debug
        : (code == grpc::StatusCode::INTERNAL || code == grpc::StatusCode::DATA_LOSS ||
           code == grpc::StatusCode::UNKNOWN)
            ? spdlog::level::warn
            : spdlog::level::info;
    if (!spdlog::should_log(level)) return;
    std::string line = absl::StrCat("event=rpc request_id=", request_id_, " method=", method_,
                                    " code=", CodeName(code),
                                    absl::StrFormat(" duration_ms=%.3f", elapsed.count() * 1e3),
                                    " peer=", storage::LogValue(peer_));
    if (!sequence_id.empty()) {
      absl::StrAppend(&line, " sequence_id=", storage::LogValue(sequence_id));
    }
    if (code != grpc::StatusCode::OK) {
      absl::StrAppend(&line, " message=", storage::LogValue(status.error_message()));
    }
    spdlog::log(level, "{}", line);
  }

  // The method's descriptor; null for a name kvstar.v1.KvStore does not have.
  const google::protobuf::MethodDescriptor* KvStoreMethod() const {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName("kvstar.v1.KvStore");
    return service != nullptr ? service->FindMethodByName(method_) : nullptr;
  }

  grpc::Status UndecodableRequest() const {
    const google::protobuf::MethodDescriptor* method = KvStoreMethod();
    const std::string type =
        method != nullptr ? method->input_type()->full_name() : std::string("its request type");
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("the ", method_, " request could not be decoded as ", type,
                     ": it is not a protobuf message of that type, or one of its string fields "
                     "(sequence_id and the other ids) is not valid UTF-8"));
  }

  Metrics* const metrics_;
  const std::string method_;
  const bool kvstar_method_;
  const bool raw_;  // registered raw: received messages are grpc::ByteBuffers
  const uint64_t request_id_;
  const std::string peer_;
  const std::chrono::steady_clock::time_point start_;
  absl::Mutex mu_;
  std::string sequence_id_ ABSL_GUARDED_BY(mu_);
  bool received_nothing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class RpcInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  RpcInterceptorFactory(Metrics* metrics, std::vector<std::string> raw_methods)
      : metrics_(metrics), raw_methods_(raw_methods.begin(), raw_methods.end()) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const std::string peer =
        info->server_context() != nullptr ? info->server_context()->peer() : "";
    const std::string method = ShortMethod(info->method());
    const bool kvstar_method = method.find('/') == std::string::npos;
    const bool raw = kvstar_method && raw_methods_.contains(method);
    return new RpcInterceptor(metrics_, method, kvstar_method, raw,
                              next_request_id_.fetch_add(1, std::memory_order_relaxed), peer);
  }

 private:
  Metrics* const metrics_;
  const absl::flat_hash_set<std::string> raw_methods_;
  std::atomic<uint64_t> next_request_id_{1};
};

// Appends a "# HELP" and "# TYPE" header.
void Header(std::string* out, const std::string& name, const std::string& type,
            const std::string& help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void Sample(std::string* out, const std::string& name, const std::string& labels, double value) {
  absl::StrAppend(out, name, labels.empty() ? "" : "{", labels, labels.empty() ? "" : "}", " ",
                  absl::StrFormat("%.12g", value), "\n");
}

}  // namespace

std::string EscapeLabelValue(const std::string& value) {
  std::string escaped;
  for (char c : value) {
    if (c == '\\') {
      escaped += "\\\\";
    } else if (c == '"') {
      escaped += "\\\"";
    } else if (c == '\n') {
      escaped += "\\n";
    } else {
      escaped += c;
    }
  }
  return escaped;
}

void Metrics::RpcStarted(const std::string& method) {
  absl::MutexLock lock(&mu_);
  ++rpcs_[method].in_flight;
}

void Metrics::RpcFinished(const std::string& method, int code, double seconds) {
  absl::MutexLock lock(&mu_);
  RpcSeries& series = rpcs_[method];
  --series.in_flight;
  ++series.requests_by_code[code];
  size_t bucket = 0;
  while (bucket < kLatencyBucketsSeconds.size() && seconds > kLatencyBucketsSeconds[bucket]) {
    ++bucket;
  }
  ++series.buckets[bucket];
  series.latency_sum_seconds += seconds;
}

std::string Metrics::Render() const {
  std::string out;
  {
    absl::MutexLock lock(&mu_);
    Header(&out, "kvstar_rpc_requests_total", "counter", "RPCs finished, by method and code.");
    for (const auto& [method, series] : rpcs_) {
      for (const auto& [code, count] : series.requests_by_code) {
        Sample(
            &out, "kvstar_rpc_requests_total",
            absl::StrCat("method=\"", EscapeLabelValue(method), "\",code=\"", CodeName(code), "\""),
            static_cast<double>(count));
      }
    }
    Header(&out, "kvstar_rpc_latency_seconds", "histogram",
           "Time from an RPC's start to its status, by method.");
    for (const auto& [method, series] : rpcs_) {
      const std::string label = absl::StrCat("method=\"", EscapeLabelValue(method), "\"");
      uint64_t cumulative = 0;
      for (size_t i = 0; i <= kLatencyBucketsSeconds.size(); ++i) {
        cumulative += series.buckets[i];
        const std::string le = i < kLatencyBucketsSeconds.size()
                                   ? absl::StrFormat("%g", kLatencyBucketsSeconds[i])
                                   : std::string("+Inf");
        Sample(&out, "kvstar_rpc_latency_seconds_bucket", absl::StrCat(label, ",le=\"", le, "\""),
               static_cast<double>(cumulative));
      }
      Sample(&out, "kvstar_rpc_latency_seconds_sum", label, series.latency_sum_seconds);
      Sample(&out, "kvstar_rpc_latency_seconds_count", label, static_cast<double>(cumulative));
    }
    Header(&out, "kvstar_rpc_in_flight", "gauge",
           "RPCs started and not finished (open streams included), by method.");
    for (const auto& [method, series] : rpcs_) {
      Sample(&out, "kvstar_rpc_in_flight",
             absl::StrCat("method=\"", EscapeLabelValue(method), "\""),
             static_cast<double>(series.in_flight));
    }
  }
  if (sources_.node_stats) {
    const NodeStats stats = sources_.node_stats();
    const std::pair<const char*, uint64_t> counters[] = {
        {"kvstar_blocks_put_total", stats.blocks_put},
        {"kvstar_blocks_got_total", stats.blocks_got},
        {"kvstar_retrievals_total", stats.retrievals},
        {"kvstar_blocks_scored_total", stats.blocks_scored},
        {"kvstar_blocks_sent_total", stats.blocks_sent},
        {"kvstar_blocks_skipped_held_total", stats.blocks_skipped_held},
        {"kvstar_blocks_sent_shared_total", stats.blocks_sent_shared},
    };
    for (const auto& [name, value] : counters) {
      Header(&out, name, "counter", "The node's Stats counter of the same name.");
      Sample(&out, name, "", static_cast<double>(value));
    }
    const std::pair<const char*, uint64_t> retrieve_times[] = {
        {"kvstar_retrieve_seconds_total", stats.retrieve_micros},
        {"kvstar_retrieve_score_seconds_total", stats.retrieve_score_micros},
        {"kvstar_retrieve_wait_seconds_total", stats.retrieve_wait_micros},
        {"kvstar_retrieve_read_seconds_total", stats.retrieve_read_micros},
        {"kvstar_retrieve_copy_seconds_total", stats.retrieve_copy_micros},
        {"kvstar_retrieve_send_seconds_total", stats.retrieve_send_micros},
    };
    for (const auto& [name, micros] : retrieve_times) {
      Header(&out, name, "counter",
             "Retrieve calls' wall time by phase, in seconds (Stats' retrieve_*_micros).");
      Sample(&out, name, "", static_cast<double>(micros) / 1e6);
    }
    Header(&out, "kvstar_tier_blocks", "gauge", "Blocks held now, per storage tier.");
    for (const storage::TierStats& tier : stats.tiers) {
      Sample(&out, "kvstar_tier_blocks", absl::StrCat("tier=\"", tier.name, "\""),
             static_cast<double>(tier.blocks));
    }
    Header(&out, "kvstar_tier_bytes", "gauge", "K+V bytes held now, per storage tier.");
    for (const storage::TierStats& tier : stats.tiers) {
      Sample(&out, "kvstar_tier_bytes", absl::StrCat("tier=\"", tier.name, "\""),
             static_cast<double>(tier.bytes));
    }
    Header(&out, "kvstar_tier_reclaim_pending_bytes", "gauge",
           "K+V bytes of dropped sequences whose disk space is not released yet, per tier.");
    for (const storage::TierStats& tier : stats.tiers) {
      Sample(&out, "kvstar_tier_reclaim_pending_bytes", absl::StrCat("tier=\"", tier.name, "\""),
             static_cast<double>(tier.reclaim_pending_bytes));
    }
    Header(&out, "kvstar_tier_reads_total", "counter",
           "Block reads per tier: result=hit served them, result=miss passed them on.");
    for (const storage::TierStats& tier : stats.tiers) {
      const std::string label = absl::StrCat("tier=\"", tier.name, "\",result=");
      Sample(&out, "kvstar_tier_reads_total", label + "\"hit\"", static_cast<double>(tier.hits));
      Sample(&out, "kvstar_tier_reads_total", label + "\"miss\"", static_cast<double>(tier.misses));
    }
    Header(&out, "kvstar_tier_hit_ratio", "gauge",
           "hits / (hits + misses) of each tier since start (0 before any read).");
    for (const storage::TierStats& tier : stats.tiers) {
      const uint64_t reads = tier.hits + tier.misses;
      Sample(&out, "kvstar_tier_hit_ratio", absl::StrCat("tier=\"", tier.name, "\""),
             reads == 0 ? 0.0 : static_cast<double>(tier.hits) / static_cast<double>(reads));
    }
    Header(&out, "kvstar_sequences", "gauge", "Sequences stored on the node.");
    Sample(&out, "kvstar_sequences", "", static_cast<double>(stats.sequences));
  }
  if (sources_.sequences_per_tenant) {
    Header(&out, "kvstar_tenant_sequences", "gauge", "Sequences stored, per tenant.");
    for (const auto& [tenant, count] : sources_.sequences_per_tenant()) {
      Sample(&out, "kvstar_tenant_sequences",
             absl::StrCat("tenant=\"", EscapeLabelValue(tenant), "\""), static_cast<double>(count));
    }
  }
  return out;
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> Metrics::InterceptorFactory(
    std::vector<std::string> raw_methods) {
  return std::make_unique<RpcInterceptorFactory>(this, std::move(raw_methods));
}

struct MetricsHttpServer::Impl {
  httplib::Server http;
  std::thread thread;
};

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, const Metrics* metrics) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_listen is \"", address, "\", must be host:port"));
  }
  const std::string host = address.substr(0, colon);
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->impl_ = std::make_unique<Impl>();
  server->impl_->http.Get("/metrics", [metrics](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics->Render(), "text/plain; version=0.0.4");
  });
  if (port == 0) {
    port = server->impl_->http.bind_to_any_port(host);
  } else if (!server->impl_->http.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    return absl::UnavailableError(absl::StrCat("--metrics_listen ", address, ": cannot bind"));
  }
  server->port_ = port;
  Impl* impl = server->impl_.get();
  impl->thread = std::thread([impl] { impl->http.listen_after_bind(); });
  // stop() is a no-op on a server not yet listening: wait for it, so the destructor can stop it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!impl->http.is_running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  if (!impl->http.is_running()) {
    return absl::UnavailableError(absl::StrCat("--metrics_listen ", address, ": not listening"));
  }
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (impl_ == nullptr) return;
  impl_->http.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace kvstar::server
