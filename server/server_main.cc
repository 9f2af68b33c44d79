// kvstar_server: the storage node binary. Opens the configured block store, serves the
// kvstar.v1.KvStore API with gRPC health checking and server reflection, and shuts down cleanly
// on SIGINT or SIGTERM.
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/flags.h"
#include "server/kvstore_service.h"
#include "server/metrics.h"
#include "server/segment_handoff.h"
#include "server/stale_segments.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"
#include "storage/block_store.h"
#include "storage/log_value.h"

namespace kvstar::server {
namespace {

constexpr char kServiceName[] = "kvstar.v1.KvStore";

absl::StatusOr<std::unique_ptr<storage::BlockStore>> OpenStore(const ServerConfig& config) {
  // Everything is in memory already: a DRAM tier in front would only copy.
  if (config.backend == "memory") return storage::NewMemoryStore();
  absl::StatusOr<std::unique_ptr<storage::BlockStore>> backend =
      config.backend == "nfs" ? storage::OpenPosixDirStore(config.data_dir)
                              : storage::OpenRocksDbStore(config.data_dir);
  if (!backend.ok()) return backend.status();
  if (config.dram_budget_bytes == 0) return backend;
  return storage::NewDramTier(*std::move(backend), config.dram_budget_bytes);
}

// Blocks SIGINT/SIGTERM in every thread and returns the set, so one thread can sigwait on it.
sigset_t BlockTerminationSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

// Named segments that servers from before per-tenant shared memory left in /dev/shm when killed
// (server/stale_segments.h says which are removed, and why that is safe).
void RemoveOldSegments() {
  constexpr char kDirectory[] = "/dev/shm";
  const StaleSegmentScan scan = RemoveStaleSegments(kDirectory);
  for (const RemovedSegment& segment : scan.removed) {
    spdlog::info("event=stale_segment_removed segment={} bytes={} reason=no_live_server_holds_it",
                 storage::LogValue(absl::StrCat(kDirectory, "/", segment.name)), segment.bytes);
  }
  for (const std::string& error : scan.errors) {
    spdlog::warn("event=stale_segment_kept message={}", storage::LogValue(error));
  }
}

int Run(int argc, char** argv) {
  const sigset_t signals = BlockTerminationSignals();
  absl::StatusOr<ServerConfig> config = ParseServerFlags(argc, argv);
  if (!config.ok()) {
    std::fprintf(stderr, "kvstar_server: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(config->log_level));
  RemoveOldSegments();

  absl::StatusOr<std::unique_ptr<storage::BlockStore>> store = OpenStore(*config);
  if (!store.ok()) {
    spdlog::error("event=store_open_failed backend={} data_dir={} message={}", config->backend,
                  storage::LogValue(config->data_dir),
                  storage::LogValue(store.status().ToString()));
    return 1;
  }
  std::unique_ptr<TokenAuth> auth;
  if (!config->auth_tokens_file.empty()) {
    absl::StatusOr<std::unique_ptr<TokenAuth>> loaded =
        TokenAuth::LoadFile(config->auth_tokens_file);
    if (!loaded.ok()) {
      spdlog::error("event=config_error flag=auth_tokens_file message={}",
                    storage::LogValue(loaded.status().ToString()));
      return 2;
    }
    auth = *std::move(loaded);
    spdlog::info("event=auth tokens={}", auth->size());
  }
  // Each tenant's segment is created when its first client asks for it on the handoff socket;
  // without one, co-located clients receive bytes through gRPC.
  std::unique_ptr<TenantSegments> shared_memory;
  std::unique_ptr<SegmentHandoff> handoff;
  if (config->shared_memory_bytes > 0) {
    const uint64_t tenants = auth != nullptr ? auth->tenant_count() : 1;
    // At least a byte: a budget smaller than a page per tenant gives every tenant none.
    const uint64_t per_tenant = config->shared_memory_bytes_per_tenant > 0
                                    ? config->shared_memory_bytes_per_tenant
                                    : std::max<uint64_t>(1, config->shared_memory_bytes / tenants);
    shared_memory = std::make_unique<TenantSegments>(config->shared_memory_bytes, per_tenant);
    const TokenAuth* checker = auth.get();
    absl::StatusOr<std::unique_ptr<SegmentHandoff>> started = SegmentHandoff::Start(
        config->shared_memory_socket,
        [checker](absl::string_view authorization) -> absl::StatusOr<std::string> {
          if (checker == nullptr) return std::string(kDefaultTenant);
          return checker->TenantOf(authorization);
        },
        shared_memory.get());
    if (started.ok()) {
      handoff = *std::move(started);
    } else {
      spdlog::warn("event=no_shared_memory message={} (co-located clients get bytes over gRPC)",
                   storage::LogValue(started.status().ToString()));
      shared_memory.reset();
    }
  }
  ServiceOptions options;
  options.auth = auth.get();
  options.admin_tenant = config->admin_tenant;
  options.shared_memory = shared_memory.get();
  if (handoff != nullptr) options.shared_memory_socket = handoff->address();
  options.retrieval_threads = static_cast<size_t>(config->retrieval_threads);
  options.copy_threads = static_cast<size_t>(config->copy_threads);
  options.segment_resident_blocks = config->segment_resident_blocks;
  options.worker_threads = static_cast<size_t>(config->worker_threads);
  options.stream_idle_timeout_ms = config->stream_idle_timeout_ms;
  options.limits.max_open_streams = config->max_open_streams;
  options.limits.max_open_streams_per_tenant = config->max_open_streams_per_tenant;
  options.limits.max_inflight_put_bytes = config->max_inflight_put_bytes;
  options.limits.max_inflight_put_bytes_per_tenant = config->max_inflight_put_bytes_per_tenant;
  options.max_reply_bytes =
      std::min<uint64_t>(options.max_reply_bytes, config->max_message_bytes / 2);
  absl::StatusOr<std::unique_ptr<KvStoreService>> service =
      KvStoreService::Create(store->get(), options);
  if (!service.ok()) {
    spdlog::error("event=load_failed message={}", storage::LogValue(service.status().ToString()));
    return 1;
  }

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = MakeServerCredentials(
      {config->tls_cert_file, config->tls_key_file, config->tls_client_ca_file});
  if (!credentials.ok()) {
    spdlog::error("event=config_error message={}",
                  storage::LogValue(credentials.status().message()));
    return 2;
  }

  StorageNode& node = (*service)->node();
  Metrics metrics(
      {[&node] { return node.Stats(); }, [&node] { return node.SequencesPerTenant(); }});

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config->listen_address, *credentials, &port);
  builder.RegisterService(service->get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(metrics.InterceptorFactory(KvStoreService::RawMethods()));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.SetMaxReceiveMessageSize(static_cast<int>(config->max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config->max_message_bytes));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::error("event=listen_failed address={}", storage::LogValue(config->listen_address));
    return 1;
  }
  server->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  server->GetHealthCheckService()->SetServingStatus("", true);
  // From now on both names follow the node's limits: NOT_SERVING while it cannot take work.
  (*service)->SetHealthCheckService(server->GetHealthCheckService());

  const std::string host = config->listen_address.substr(0, config->listen_address.rfind(':'));
  spdlog::info(
      "event=serving service={} address={}:{} backend={} data_dir={} dram_budget_bytes={} "
      "worker_threads={} shared_memory={} transport={} max_open_streams={} "
      "max_open_streams_per_tenant={} max_inflight_put_bytes={} "
      "max_inflight_put_bytes_per_tenant={} stream_idle_timeout_ms={}",
      kServiceName, host, port, config->backend, storage::LogValue(config->data_dir),
      config->dram_budget_bytes, config->worker_threads,
      shared_memory ? storage::LogValue(absl::StrCat(
                          handoff->address(), " total_bytes:", shared_memory->total_bytes(),
                          " bytes_per_tenant:", shared_memory->bytes_per_tenant()))
                    : std::string("off"),
      config->tls_cert_file.empty()        ? "plaintext"
      : config->tls_client_ca_file.empty() ? "tls"
                                           : "mutual_tls",
      config->max_open_streams, config->max_open_streams_per_tenant, config->max_inflight_put_bytes,
      config->max_inflight_put_bytes_per_tenant, config->stream_idle_timeout_ms);
  std::unique_ptr<MetricsHttpServer> metrics_http;
  if (!config->metrics_listen.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> started =
        MetricsHttpServer::Start(config->metrics_listen, &metrics);
    if (!started.ok()) {
      spdlog::error("event=config_error message={}", storage::LogValue(started.status().message()));
      return 2;
    }
    metrics_http = *std::move(started);
    spdlog::info("event=metrics url=http://{}:{}/metrics",
                 config->metrics_listen.substr(0, config->metrics_listen.rfind(':')),
                 metrics_http->port());
  }
  if (!config->port_file.empty()) {
    // Write then rename, so a reader never sees a partial port number.
    const std::string temp = config->port_file + ".tmp";
    std::ofstream(temp) << port << "\n";
    std::rename(temp.c_str(), config->port_file.c_str());
  }

  int signal = 0;
  sigwait(&signals, &signal);
  spdlog::info("event=shutdown signal={}", signal);
  (*service)->SetHealthCheckService(nullptr);
  server->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  metrics_http.reset();
  spdlog::info("event=stopped");
  return 0;
}

}  // namespace
}  // namespace kvstar::server

int main(int argc, char** argv) { return kvstar::server::Run(argc, argv); }
