// ServerProcess: runs the real kvstar_server binary as a child process on a loopback port, for
// integration tests. Not thread-safe; one test thread drives it.
#ifndef KVSTAR_TESTS_INTEGRATION_SERVER_PROCESS_H_
#define KVSTAR_TESTS_INTEGRATION_SERVER_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"

namespace kvstar::testing {

class ServerProcess {
 public:
  // `flags` are passed to kvstar_server after --listen=127.0.0.1:0 and --port_file.
  explicit ServerProcess(std::vector<std::string> flags);
  // The server's stdout and stderr (its log) go to `path`, appended, instead of the test's.
  void LogTo(std::string path) { log_path_ = std::move(path); }
  ~ServerProcess();  // kills the server if it still runs

  // Starts the server and waits (up to 60 s) until it serves. The port changes on each start.
  absl::Status Start();
  // SIGTERM and wait for a clean exit; returns an error if it exits non-zero.
  absl::Status Stop();
  // SIGKILL: an abrupt crash.
  void Kill();

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string address() const;
  // A channel and stub to the running server (created on each Start).
  v1::KvStore::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  std::vector<std::string> flags_;
  std::string log_path_;
  std::string port_file_;
  pid_t pid_ = -1;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvStore::Stub> stub_;
};

// Path of a fresh, empty directory under the test's temporary directory.
std::string MakeTempDir(const std::string& prefix);

// Bytes used on disk under `path` (like du -sb).
uint64_t DiskUsageBytes(const std::string& path);

}  // namespace kvstar::testing

#endif  // KVSTAR_TESTS_INTEGRATION_SERVER_PROCESS_H_
