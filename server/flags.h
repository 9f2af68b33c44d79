// Configuration of the kvstar_server binary: one struct, filled from command-line flags.
#ifndef KVSTAR_SERVER_FLAGS_H_
#define KVSTAR_SERVER_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace kvstar::server {

struct ServerConfig {
  std::string listen_address;  // host:port; port 0 picks a free port
  std::string backend;         // "rocksdb", "nfs" or "memory"
  std::string data_dir;        // where the backend keeps its files
  uint64_t dram_budget_bytes = 0;
  uint64_t shared_memory_bytes = 0;             // all tenants' segments together; 0: none
  uint64_t shared_memory_bytes_per_tenant = 0;  // 0: shared_memory_bytes split over the tenants
  std::string shared_memory_socket;             // "": an abstract name of its own; "@name"; a path
  bool segment_resident_blocks = false;         // keep put blocks in the tenant's segment too
  int worker_threads = 0;                       // threads that run calls' store I/O and scoring
  int retrieval_threads = 0;                    // 0: one per hardware thread
  int copy_threads = 0;                         // 0: one per hardware thread
  uint64_t max_message_bytes = 0;
  uint64_t stream_idle_timeout_ms = 0;  // 0: streams never time out
  uint64_t max_open_streams = 0;
  uint64_t max_open_streams_per_tenant = 0;
  uint64_t max_inflight_put_bytes = 0;
  uint64_t max_inflight_put_bytes_per_tenant = 0;
  std::string auth_tokens_file;  // "<token> <tenant>" lines; empty: no authentication
  std::string admin_tenant;      // with auth: this tenant's tokens see the whole node's Stats
  std::string tls_cert_file;     // PEM chain; with tls_key_file: serve TLS only
  std::string tls_key_file;
  std::string tls_client_ca_file;  // set: clients must present a certificate this CA signed
  std::string metrics_listen;      // host:port of the Prometheus endpoint; empty: none
  std::string port_file;           // when set, the bound port is written here once serving
  std::string log_level;
};

// Parses argv (absl flags; --help lists them) and checks the values. Exits on --help.
absl::StatusOr<ServerConfig> ParseServerFlags(int argc, char** argv);

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_FLAGS_H_
