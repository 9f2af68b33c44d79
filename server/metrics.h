// Metrics of the storage node in Prometheus' text format: per-RPC request counts by status code,
// latency histograms and RPCs in flight (recorded by a gRPC server interceptor, so no handler
// changes), plus the node's counters and tier contents, read at scrape time from the node.
// Thread-safe: RPC threads record, the HTTP thread renders.
#ifndef KVSTAR_SERVER_METRICS_H_
#define KVSTAR_SERVER_METRICS_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/server_interceptor.h"
#include "server/storage_node.h"

namespace kvstar::server {

class Metrics {
 public:
  // Upper bounds of the latency buckets, in seconds (+Inf is implicit).
  static constexpr std::array<double, 14> kLatencyBucketsSeconds = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5};

  // What a scrape reads besides the RPC metrics: the node-wide Stats, and sequences per tenant.
  struct Sources {
    std::function<NodeStats()> node_stats;
    std::function<std::map<std::string, uint64_t>()> sequences_per_tenant;
  };

  explicit Metrics(Sources sources) : sources_(std::move(sources)) {}

  // `method` is the RPC's short name ("Retrieve"); `code` its final status code.
  void RpcStarted(const std::string& method);
  void RpcFinished(const std::string& method, int code, double seconds);

  // The whole exposition, text format 0.0.4.
  std::string Render() const;

  // An interceptor factory that records every RPC of the server into this object. The Metrics
  // object must outlive the server. `raw_methods` names the kvstar methods registered raw
  // (KvStoreService::RawMethods()), whose messages are grpc::ByteBuffers, not protobuf messages.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> InterceptorFactory(
      std::vector<std::string> raw_methods);

 private:
  struct RpcSeries {
    std::map<int, uint64_t> requests_by_code;
    std::array<uint64_t, kLatencyBucketsSeconds.size() + 1> buckets{};  // last: +Inf
    double latency_sum_seconds = 0;
    int64_t in_flight = 0;
  };

  const Sources sources_;
  mutable absl::Mutex mu_;
  std::map<std::string, RpcSeries> rpcs_ ABSL_GUARDED_BY(mu_);
};

// Escapes a label value for the text format (backslash, double quote, newline).
std::string EscapeLabelValue(const std::string& value);

// Serves Render() at GET /metrics over HTTP on `address` (host:port, port 0 picks one) from a
// thread of its own until destroyed.
class MetricsHttpServer {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  const Metrics* metrics);
  ~MetricsHttpServer();
  int port() const { return port_; }

 private:
  struct Impl;
  MetricsHttpServer() = default;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_METRICS_H_
