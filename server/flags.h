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
  uint64_t shared_memory_bytes = 0;  // co-located clients' segment; 0: none
  int worker_threads = 0;
  int retrieval_threads = 0;  // 0: one per hardware thread
  uint64_t max_message_bytes = 0;
  std::string auth_tokens_file;  // "<token> <tenant>" lines; empty: no authentication
  std::string tls_cert_file;     // PEM chain; with tls_key_file: serve TLS only
  std::string tls_key_file;
  std::string tls_client_ca_file;  // set: clients must present a certificate this CA signed
  std::string port_file;           // when set, the bound port is written here once serving
  std::string log_level;
};

// Parses argv (absl flags; --help lists them) and checks the values. Exits on --help.
absl::StatusOr<ServerConfig> ParseServerFlags(int argc, char** argv);

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_FLAGS_H_
