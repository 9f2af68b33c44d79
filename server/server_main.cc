// kvstar_server: the storage node binary. Opens the configured block store, serves the
// kvstar.v1.KvStore API with gRPC health checking and server reflection, and shuts down cleanly
// on SIGINT or SIGTERM.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/resource_quota.h"
#include "server/flags.h"
#include "server/kvstore_service.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"
#include "storage/block_store.h"

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

int Run(int argc, char** argv) {
  const sigset_t signals = BlockTerminationSignals();
  absl::StatusOr<ServerConfig> config = ParseServerFlags(argc, argv);
  if (!config.ok()) {
    std::fprintf(stderr, "kvstar_server: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(config->log_level));

  absl::StatusOr<std::unique_ptr<storage::BlockStore>> store = OpenStore(*config);
  if (!store.ok()) {
    spdlog::error("cannot open {} store in {}: {}", config->backend, config->data_dir,
                  store.status().ToString());
    return 1;
  }
  // A segment the size asked for, or none: co-located clients then receive bytes through gRPC.
  std::unique_ptr<SharedMemoryArena> shared_memory;
  if (config->shared_memory_bytes > 0) {
    absl::StatusOr<std::unique_ptr<SharedMemoryArena>> arena =
        SharedMemoryArena::Create(config->shared_memory_bytes);
    if (arena.ok()) {
      shared_memory = *std::move(arena);
    } else {
      spdlog::warn("no shared-memory segment ({}); co-located clients get bytes over gRPC",
                   arena.status().ToString());
    }
  }
  std::unique_ptr<TokenAuth> auth;
  if (!config->auth_tokens_file.empty()) {
    absl::StatusOr<std::unique_ptr<TokenAuth>> loaded =
        TokenAuth::LoadFile(config->auth_tokens_file);
    if (!loaded.ok()) {
      spdlog::error("--auth_tokens_file: {}", loaded.status().ToString());
      return 2;
    }
    auth = *std::move(loaded);
    spdlog::info("bearer-token authentication on: {} tokens", auth->size());
  }
  ServiceOptions options;
  options.auth = auth.get();
  options.shared_memory = shared_memory.get();
  options.retrieval_threads = static_cast<size_t>(config->retrieval_threads);
  options.max_reply_bytes =
      std::min<uint64_t>(options.max_reply_bytes, config->max_message_bytes / 2);
  absl::StatusOr<std::unique_ptr<KvStoreService>> service =
      KvStoreService::Create(store->get(), options);
  if (!service.ok()) {
    spdlog::error("cannot load sequences: {}", service.status().ToString());
    return 1;
  }

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = MakeServerCredentials(
      {config->tls_cert_file, config->tls_key_file, config->tls_client_ca_file});
  if (!credentials.ok()) {
    spdlog::error("{}", std::string(credentials.status().message()));
    return 2;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config->listen_address, *credentials, &port);
  builder.RegisterService(service->get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(config->max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config->max_message_bytes));
  grpc::ResourceQuota quota("kvstar_server");
  quota.SetMaxThreads(config->worker_threads + 2);  // +2: gRPC's own pollers need threads too
  builder.SetResourceQuota(quota);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::error("cannot listen on {}", config->listen_address);
    return 1;
  }
  server->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  server->GetHealthCheckService()->SetServingStatus("", true);

  const std::string host = config->listen_address.substr(0, config->listen_address.rfind(':'));
  spdlog::info(
      "kvstar_server serving {} on {}:{} (backend {} in {}, DRAM tier {} bytes, {} "
      "worker threads, shared memory {}, {})",
      kServiceName, host, port, config->backend, config->data_dir, config->dram_budget_bytes,
      config->worker_threads,
      shared_memory ? absl::StrCat(shared_memory->name(), ", ", shared_memory->size(), " bytes")
                    : std::string("off"),
      config->tls_cert_file.empty()        ? "plaintext"
      : config->tls_client_ca_file.empty() ? "TLS"
                                           : "TLS with client certificates");
  if (!config->port_file.empty()) {
    // Write then rename, so a reader never sees a partial port number.
    const std::string temp = config->port_file + ".tmp";
    std::ofstream(temp) << port << "\n";
    std::rename(temp.c_str(), config->port_file.c_str());
  }

  int signal = 0;
  sigwait(&signals, &signal);
  spdlog::info("signal {}: shutting down", signal);
  server->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace kvstar::server

int main(int argc, char** argv) { return kvstar::server::Run(argc, argv); }
