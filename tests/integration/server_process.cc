#include "tests/integration/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace kvstar::testing {
namespace {

std::string ServerBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr && workspace != nullptr) {
    return absl::StrCat(srcdir, "/", workspace, "/server/kvstar_server");
  }
  // `bazel run` starts a binary in its runfiles tree, where the server lies beside it.
  if (std::filesystem::exists("server/kvstar_server")) return "server/kvstar_server";
  return "bazel-bin/server/kvstar_server";
}

}  // namespace

std::string MakeTempDir(const std::string& prefix) {
  const char* root = std::getenv("TEST_TMPDIR");
  std::string pattern = absl::StrCat(root != nullptr ? root : "/tmp", "/", prefix, "XXXXXX");
  char* made = mkdtemp(pattern.data());
  return made != nullptr ? std::string(made) : std::string();
}

uint64_t DiskUsageBytes(const std::string& path) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(path, ec);
       it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    if (it->is_regular_file(ec)) total += it->file_size(ec);
  }
  return total;
}

ServerProcess::ServerProcess(std::vector<std::string> flags) : flags_(std::move(flags)) {
  port_file_ = MakeTempDir("port") + "/port";
}

ServerProcess::~ServerProcess() { Kill(); }

std::string ServerProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

absl::Status ServerProcess::Start() {
  if (pid_ > 0) return absl::FailedPreconditionError("server already running");
  std::remove(port_file_.c_str());
  std::vector<std::string> args = {ServerBinary(), "--listen=127.0.0.1:0",
                                   absl::StrCat("--port_file=", port_file_)};
  args.insert(args.end(), flags_.begin(), flags_.end());
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (!log_path_.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  const int err = posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) {
    pid_ = -1;
    return absl::InternalError(absl::StrCat("posix_spawn ", argv[0], ": ", strerror(err)));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::InternalError(
          absl::StrCat("kvstar_server exited during start-up, status ", status));
    }
    std::ifstream in(port_file_);
    if (in >> port_ && port_ > 0) {
      channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
      stub_ = v1::KvStore::NewStub(channel_);
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  Kill();
  return absl::DeadlineExceededError("kvstar_server did not write its port within 60 s");
}

absl::Status ServerProcess::Stop() {
  if (pid_ <= 0) return absl::OkStatus();
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  stub_.reset();
  channel_.reset();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat("kvstar_server did not exit cleanly, status ", status));
  }
  return absl::OkStatus();
}

void ServerProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
  stub_.reset();
  channel_.reset();
}

}  // namespace kvstar::testing
