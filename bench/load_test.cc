// load_test: the real kvstar_server binary under concurrent clients on loopback.
//
//   bazel run -c opt //bench:load_test -- --clients=64 --idle_streams=100 --seconds=10
//
// Starts the server with its default flags (backend, DRAM budget, limits; only --data_dir and
// --log_level are set) and runs three phases of --seconds each, every one with --clients clients
// that each cycle through --sequences sequences: CreateSequence, PutBlocks, Seal, Retrieve,
// GetBlocks, DropSequence. Each client has its own channel (its own connection).
//   baseline  the clients alone;
//   idle      plus --idle_streams clients that each hold a PutBlocks stream open and send nothing;
//   drop      plus one client that drops a sequence of --drop_mib MiB in the middle of the phase
//             (put before the phase starts); calls in flight while the drop runs are reported
//             apart ("during drop").
// It prints requests/s, p50/p99 per RPC and phase, errors, the server's threads and peak RSS
// (VmHWM), the targets with the numbers measured against them, and as its last line one
// JSON object. With --check it exits 1 when a call failed or a target was missed. Its temporary
// directory (the server's data, its port file) is removed when the run ends, also when it fails or
// is ended by SIGINT/SIGTERM/SIGHUP.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

ABSL_FLAG(int, clients, 64, "Concurrent working clients.");
ABSL_FLAG(int, sequences, 3, "Sequences each client cycles through.");
ABSL_FLAG(int, retrieves, 4, "Retrieve calls per sequence between its Seal and its drop.");
ABSL_FLAG(int, idle_streams, 100, "Clients that hold a PutBlocks stream open and idle (phase 2).");
ABSL_FLAG(double, seconds, 10, "Length of each phase.");
ABSL_FLAG(int, drop_mib, 256, "Size of the sequence dropped in phase 3 (0: no drop phase).");
ABSL_FLAG(std::string, backend, "rocksdb", "--backend of the server.");
ABSL_FLAG(bool, check, false, "Exit 1 when a call failed or a target was missed.");
ABSL_FLAG(bool, check_errors_only, false,
          "With --check, judge only errors (for small CI runs on a busy machine).");

namespace kvstar::bench {
namespace {

using Clock = std::chrono::steady_clock;

// A small model: 4 layers, 4 q / 2 KV heads of dim 64, 128-token blocks in bf16: 32 KiB of K
// per block, 8 blocks per layer, 2 MiB per sequence.
constexpr uint32_t kLayers = 4;
constexpr uint32_t kQHeads = 4;
constexpr uint32_t kKvHeads = 2;
constexpr uint32_t kHeadDim = 64;
constexpr uint32_t kBlockSize = 128;
constexpr uint32_t kBlocksPerLayer = 8;
constexpr uint64_t kKeyBytes = uint64_t{kBlockSize} * kKvHeads * kHeadDim * 2;
constexpr uint32_t kQueries = 8;

const char* const kRpcs[] = {"CreateSequence", "PutBlocks", "Seal",
                             "Retrieve",       "GetBlocks", "DropSequence"};

v1::ModelProfile Profile() {
  v1::ModelProfile profile;
  profile.set_num_layers(kLayers);
  profile.set_num_q_heads(kQHeads);
  profile.set_num_kv_heads(kKvHeads);
  profile.set_head_dim(kHeadDim);
  profile.set_block_size(kBlockSize);
  profile.set_dtype(v1::DTYPE_BF16);
  return profile;
}

struct Call {
  int rpc;
  double start_s;  // since the phase began
  double ms;
  bool ok;
};

// Everything one client recorded in one phase.
struct Record {
  std::vector<Call> calls;
  std::map<std::string, int> error_messages;
};

std::shared_ptr<grpc::Channel> NewChannel(const std::string& address, int id) {
  grpc::ChannelArguments args;
  args.SetInt("kvstar.load_test_client", id);  // a distinct argument: a connection of its own
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// The data every client sends: the same blocks and queries (bytes do not change the work).
struct Workload {
  std::vector<v1::PutBlocksRequest> put_messages;  // one per layer, sequence_id unset
  google::protobuf::RepeatedPtrField<v1::LayerQueries> queries;

  Workload() {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::PutBlocksRequest message;
      for (uint32_t i = 0; i < kBlocksPerLayer; ++i) {
        *message.add_blocks() = testing::MakeBf16Block(3, layer, i, kKeyBytes);
      }
      put_messages.push_back(std::move(message));
      v1::LayerQueries* q = queries.Add();
      q->set_layer(layer);
      q->set_num_queries(kQueries);
      std::string bytes(uint64_t{kQueries} * kQHeads * kHeadDim * 2, '\0');
      testing::FillBf16Normal(1000 + layer, &bytes);
      q->set_queries(bytes);
    }
  }
};

class Client {
 public:
  Client(int id, const std::string& address, const Workload& workload)
      : id_(id), stub_(v1::KvStore::NewStub(NewChannel(address, id))), workload_(workload) {}

  // Cycles create / put / seal / retrieve / get / drop over its sequences until `stop`. Once
  // stopped it only drops (untimed) the sequences of its unfinished round.
  void Run(int sequences, Clock::time_point phase_start, const std::atomic<bool>& stop,
           Record* record) {
    for (uint64_t round = 0; !stop.load(); ++round) {
      std::vector<std::string> ids;
      for (int s = 0; s < sequences; ++s) {
        ids.push_back(absl::StrCat("load-", id_, "-", s, "-", round));
      }
      size_t created = 0;
      auto step = [&](int rpc, auto call) {
        for (const std::string& id : ids) {
          if (stop.load()) return false;
          Timed(rpc, phase_start, record, [&] { return call(id); });
          if (rpc == 0) ++created;
        }
        return true;
      };
      const bool finished = step(0, [&](const std::string& id) { return Create(id); }) &&
                            step(1, [&](const std::string& id) { return Put(id); }) &&
                            step(2, [&](const std::string& id) { return Seal(id); }) &&
                            RetrieveSteps(step) &&
                            step(4, [&](const std::string& id) { return Get(id); }) &&
                            step(5, [&](const std::string& id) { return Drop(id); });
      if (!finished) {
        for (size_t i = 0; i < created; ++i) Drop(ids[i]);
      }
    }
  }

 private:
  // Decode steps 8, 16, ...: each a Retrieve of every sequence.
  template <typename Step>
  bool RetrieveSteps(Step& step) {
    for (int r = 0; r < retrieves_; ++r) {
      const uint64_t decode_step = 8 * (r + 1);
      if (!step(3, [&](const std::string& id) { return Retrieve(id, decode_step); })) return false;
    }
    return true;
  }

  template <typename F>
  void Timed(int rpc, Clock::time_point phase_start, Record* record, F call) {
    const Clock::time_point start = Clock::now();
    grpc::Status status = call();
    const Clock::time_point end = Clock::now();
    record->calls.push_back({rpc, std::chrono::duration<double>(start - phase_start).count(),
                             std::chrono::duration<double, std::milli>(end - start).count(),
                             status.ok()});
    if (!status.ok()) {
      ++record->error_messages[absl::StrCat(kRpcs[rpc], ": ", status.error_code(), " ",
                                            status.error_message())];
    }
  }

  // A connection that failed is waited for (up to the deadline), as a client that retries would.
  void Deadline(grpc::ClientContext& context) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    context.set_wait_for_ready(true);
  }

  grpc::Status Create(const std::string& id) {
    grpc::ClientContext context;
    Deadline(context);
    v1::CreateSequenceRequest request;
    request.set_sequence_id(id);
    *request.mutable_profile() = Profile();
    v1::CreateSequenceResponse response;
    return stub_->CreateSequence(&context, request, &response);
  }

  grpc::Status Put(const std::string& id) {
    grpc::ClientContext context;
    Deadline(context);
    v1::PutBlocksResponse response;
    auto writer = stub_->PutBlocks(&context, &response);
    for (const v1::PutBlocksRequest& layer : workload_.put_messages) {
      v1::PutBlocksRequest message = layer;
      message.set_sequence_id(id);
      if (!writer->Write(message)) break;
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (status.ok() && response.blocks_written() != kLayers * kBlocksPerLayer) {
      return grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat("wrote ", response.blocks_written(), " blocks"));
    }
    return status;
  }

  grpc::Status Seal(const std::string& id) {
    grpc::ClientContext context;
    Deadline(context);
    v1::SealRequest request;
    request.set_sequence_id(id);
    *request.mutable_queries() = workload_.queries;
    v1::SealResponse response;
    return stub_->Seal(&context, request, &response);
  }

  grpc::Status Retrieve(const std::string& id, uint64_t decode_step) {
    grpc::ClientContext context;
    Deadline(context);
    v1::RetrieveRequest request;
    v1::SequenceQueries* part = request.add_sequences();
    part->set_sequence_id(id);
    part->set_decode_step(decode_step);
    part->set_include_data(true);
    *part->mutable_queries() = workload_.queries;
    auto reader = stub_->Retrieve(&context, request);
    v1::RetrieveResponse reply;
    uint32_t selections = 0;
    while (reader->Read(&reply)) selections += reply.has_selection() && !reply.more();
    grpc::Status status = reader->Finish();
    if (status.ok() && selections < kLayers) {
      return grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat("Retrieve answered ", selections, " layers"));
    }
    return status;
  }

  grpc::Status Get(const std::string& id) {
    grpc::ClientContext context;
    Deadline(context);
    v1::GetBlocksRequest request;
    request.set_sequence_id(id);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::BlockRef* ref = request.add_blocks();
      ref->set_layer(layer);
      ref->set_block_index(layer);
    }
    auto reader = stub_->GetBlocks(&context, request);
    v1::GetBlocksResponse reply;
    int blocks = 0;
    while (reader->Read(&reply)) blocks += reply.blocks_size();
    grpc::Status status = reader->Finish();
    if (status.ok() && blocks != static_cast<int>(kLayers)) {
      return grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("got ", blocks, " blocks"));
    }
    return status;
  }

  grpc::Status Drop(const std::string& id) {
    grpc::ClientContext context;
    Deadline(context);
    v1::DropSequenceRequest request;
    request.set_sequence_id(id);
    v1::DropSequenceResponse response;
    return stub_->DropSequence(&context, request, &response);
  }

  const int id_;
  const int retrieves_ = absl::GetFlag(FLAGS_retrieves);
  std::unique_ptr<v1::KvStore::Stub> stub_;
  const Workload& workload_;
};

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t rank = std::min(values.size() - 1, static_cast<size_t>(p * values.size()));
  return values[rank];
}

struct RpcSummary {
  size_t calls = 0;
  size_t errors = 0;
  double p50_ms = 0;
  double p99_ms = 0;
};

struct PhaseResult {
  std::string name;
  double seconds = 0;
  size_t calls = 0;
  size_t errors = 0;
  RpcSummary rpcs[6];
  std::map<std::string, int> error_messages;
  int server_threads = 0;
};

// Calls with start in [from_s, to_s) of the records (all when to_s < 0).
PhaseResult Summarize(const std::string& name, double seconds, const std::vector<Record>& records,
                      double from_s = 0, double to_s = -1) {
  PhaseResult result;
  result.name = name;
  result.seconds = seconds;
  std::vector<double> latencies[6];
  for (const Record& record : records) {
    for (const Call& call : record.calls) {
      const double end_s = call.start_s + call.ms / 1000;
      if (to_s >= 0 && (call.start_s >= to_s || end_s < from_s)) continue;
      latencies[call.rpc].push_back(call.ms);
      ++result.calls;
      result.rpcs[call.rpc].calls++;
      if (!call.ok) {
        ++result.errors;
        ++result.rpcs[call.rpc].errors;
      }
    }
    for (const auto& [message, count] : record.error_messages) {
      result.error_messages[message] += count;
    }
  }
  for (int r = 0; r < 6; ++r) {
    result.rpcs[r].p50_ms = Percentile(latencies[r], 0.50);
    result.rpcs[r].p99_ms = Percentile(latencies[r], 0.99);
  }
  return result;
}

void Print(const PhaseResult& phase) {
  std::printf("phase %-12s %6zu calls in %5.1f s = %7.1f requests/s, %zu errors\n",
              phase.name.c_str(), phase.calls, phase.seconds,
              phase.seconds > 0 ? phase.calls / phase.seconds : 0.0, phase.errors);
  for (int r = 0; r < 6; ++r) {
    const RpcSummary& s = phase.rpcs[r];
    std::printf("  %-15s %6zu calls  p50 %8.2f ms  p99 %8.2f ms  %zu errors\n", kRpcs[r], s.calls,
                s.p50_ms, s.p99_ms, s.errors);
  }
  int shown = 0;
  for (const auto& [message, count] : phase.error_messages) {
    if (shown++ < 5) std::printf("  error x%d: %s\n", count, message.c_str());
  }
}

// A field of /proc/<pid>/status (kB for sizes), or -1.
long ProcStatus(pid_t pid, const std::string& field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::atol(line.c_str() + field.size() + 1);
  }
  return -1;
}

// Runs the working clients for one phase; `during` runs on the main thread meanwhile.
template <typename During>
std::vector<Record> RunPhase(std::vector<std::unique_ptr<Client>>& clients, double seconds,
                             Clock::time_point* started, double* elapsed_s, During during) {
  std::atomic<bool> stop{false};
  std::vector<Record> records(clients.size());
  *started = Clock::now();
  std::vector<std::thread> threads;
  for (size_t i = 0; i < clients.size(); ++i) {
    threads.emplace_back(
        [&, i] { clients[i]->Run(absl::GetFlag(FLAGS_sequences), *started, stop, &records[i]); });
  }
  during();
  std::this_thread::sleep_until(*started + std::chrono::duration<double>(seconds));
  stop = true;
  for (std::thread& thread : threads) thread.join();
  *elapsed_s = std::chrono::duration<double>(Clock::now() - *started).count();
  return records;
}

// Puts a sequence of `mib` MiB (32-block messages) through one stream.
grpc::Status PutBig(v1::KvStore::Stub& stub, const std::string& id, int mib) {
  grpc::ClientContext create_context;
  v1::CreateSequenceRequest create;
  create.set_sequence_id(id);
  *create.mutable_profile() = Profile();
  v1::CreateSequenceResponse created;
  if (auto s = stub.CreateSequence(&create_context, create, &created); !s.ok()) return s;
  const uint64_t blocks = (uint64_t{static_cast<uint64_t>(mib)} << 20) / (2 * kKeyBytes);
  const uint32_t per_layer = static_cast<uint32_t>(blocks / kLayers);
  grpc::ClientContext context;
  v1::PutBlocksResponse response;
  auto writer = stub.PutBlocks(&context, &response);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    v1::Block block = testing::MakeBlock(5, layer, 0, kKeyBytes);
    for (uint32_t first = 0; first < per_layer; first += 32) {
      v1::PutBlocksRequest message;
      message.set_sequence_id(id);
      for (uint32_t i = first; i < std::min(per_layer, first + 32); ++i) {
        block.set_block_index(i);
        *message.add_blocks() = block;
      }
      if (!writer->Write(message)) break;
    }
  }
  writer->WritesDone();
  return writer->Finish();
}

// What a termination signal finds to clean up: the server to kill and the run's directory.
struct Cleanup {
  absl::Mutex mu;
  pid_t server_pid ABSL_GUARDED_BY(mu) = -1;
  std::string run_dir ABSL_GUARDED_BY(mu);
};
Cleanup& RunCleanup() {
  static Cleanup* cleanup = new Cleanup;
  return *cleanup;
}

// The run's one temporary directory, under $TEST_TMPDIR or /tmp: the server's data and the
// port file of testing::ServerProcess (TEST_TMPDIR is pointed at it, so MakeTempDir makes its
// directories inside). Removed when Run returns, on every path; declared before the server, so
// the server is gone first.
class RunDir {
 public:
  RunDir() : path_(testing::MakeTempDir("load_test")) {
    if (path_.empty()) return;
    setenv("TEST_TMPDIR", path_.c_str(), 1);
    absl::MutexLock lock(&RunCleanup().mu);
    RunCleanup().run_dir = path_;
  }
  ~RunDir() {
    absl::MutexLock lock(&RunCleanup().mu);
    RemoveTree(path_);
    RunCleanup().run_dir.clear();
    RunCleanup().server_pid = -1;  // killed and reaped by its ServerProcess by now
  }
  RunDir(const RunDir&) = delete;
  RunDir& operator=(const RunDir&) = delete;
  const std::string& path() const { return path_; }

  static void RemoveTree(const std::string& path) {
    if (path.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec)
      std::fprintf(stderr, "load_test: removing %s: %s\n", path.c_str(), ec.message().c_str());
  }

 private:
  const std::string path_;
};

// SIGINT, SIGTERM and SIGHUP (blocked in every thread by main) end the run here: the server is
// killed and the run's directory removed before the process exits with 128 + the signal.
void CleanUpOnTerminationSignals(sigset_t signals) {
  std::thread([signals] {
    int signal_number = 0;
    if (sigwait(&signals, &signal_number) != 0) return;
    Cleanup& cleanup = RunCleanup();
    absl::MutexLock lock(&cleanup.mu);
    if (cleanup.server_pid > 0) {
      kill(cleanup.server_pid, SIGKILL);
      waitpid(cleanup.server_pid, nullptr, 0);
    }
    RunDir::RemoveTree(cleanup.run_dir);
    std::fprintf(stderr, "load_test: signal %d, server killed and %s removed\n", signal_number,
                 cleanup.run_dir.c_str());
    _exit(128 + signal_number);
  }).detach();
}

int Run() {
  const int num_clients = absl::GetFlag(FLAGS_clients);
  const int num_idle = absl::GetFlag(FLAGS_idle_streams);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const int drop_mib = absl::GetFlag(FLAGS_drop_mib);

  const RunDir run_dir;
  if (run_dir.path().empty()) {
    std::fprintf(stderr, "load_test: cannot make a temporary directory: %s\n",
                 std::strerror(errno));
    return 1;
  }
  // Default flags but where the data lives and how much it logs.
  testing::ServerProcess server({"--backend=" + absl::GetFlag(FLAGS_backend),
                                 "--data_dir=" + run_dir.path() + "/data", "--log_level=warn"});
  if (absl::Status s = server.Start(); !s.ok()) {
    std::fprintf(stderr, "load_test: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  const pid_t pid = server.pid();
  {
    absl::MutexLock lock(&RunCleanup().mu);
    RunCleanup().server_pid = pid;
  }
  std::printf(
      "kvstar_server pid %d on %s (default flags, --backend=%s); %d clients x %d "
      "sequences of %u layers x %u blocks (%llu KiB each), %d retrieves each, %.1f s per phase\n",
      pid, server.address().c_str(), absl::GetFlag(FLAGS_backend).c_str(), num_clients,
      absl::GetFlag(FLAGS_sequences), kLayers, kBlocksPerLayer,
      static_cast<unsigned long long>(2 * kKeyBytes / 1024), absl::GetFlag(FLAGS_retrieves),
      seconds);
  std::printf("server threads at start: %ld\n", ProcStatus(pid, "Threads"));

  const Workload workload;
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < num_clients; ++i) {
    clients.push_back(std::make_unique<Client>(i, server.address(), workload));
  }
  std::vector<PhaseResult> phases;
  Clock::time_point started;

  // Phase 1: the clients alone.
  double elapsed_s = 0;
  std::vector<Record> records = RunPhase(clients, seconds, &started, &elapsed_s, [] {});
  phases.push_back(Summarize("baseline", elapsed_s, records));
  phases.back().server_threads = static_cast<int>(ProcStatus(pid, "Threads"));
  Print(phases.back());

  // Phase 2: plus idle streams, each on a channel of its own.
  {
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    std::vector<std::unique_ptr<v1::KvStore::Stub>> stubs;
    std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
    std::vector<v1::PutBlocksResponse> responses(num_idle);
    std::vector<std::unique_ptr<grpc::ClientWriter<v1::PutBlocksRequest>>> writers;
    for (int i = 0; i < num_idle; ++i) {
      channels.push_back(NewChannel(server.address(), 100000 + i));
      stubs.push_back(v1::KvStore::NewStub(channels.back()));
      contexts.push_back(std::make_unique<grpc::ClientContext>());
      writers.push_back(stubs.back()->PutBlocks(contexts.back().get(), &responses[i]));
    }
    records = RunPhase(clients, seconds, &started, &elapsed_s, [] {});
    phases.push_back(Summarize("idle", elapsed_s, records));
    phases.back().server_threads = static_cast<int>(ProcStatus(pid, "Threads"));
    Print(phases.back());
    std::printf("  %d idle PutBlocks streams open; server threads now %d (baseline %d)\n", num_idle,
                phases.back().server_threads, phases[0].server_threads);
    for (int i = 0; i < num_idle; ++i) {
      contexts[i]->TryCancel();
      writers[i]->Finish();
    }
    std::printf(
        "  the idle streams were open %.1f s (the server ends a stream idle for "
        "--stream_idle_timeout_ms, 30 s by default)\n",
        elapsed_s);
  }

  // Phase 3: a big sequence dropped in the middle.
  double drop_ms = 0;
  double drop_from_s = 0, drop_to_s = 0;
  if (drop_mib > 0) {
    auto channel = NewChannel(server.address(), 200000);
    auto stub = v1::KvStore::NewStub(channel);
    const Clock::time_point put_start = Clock::now();
    grpc::Status put = PutBig(*stub, "load-big", drop_mib);
    std::printf("put %d MiB sequence load-big: %s in %.1f s\n", drop_mib,
                put.ok() ? "OK" : put.error_message().c_str(),
                std::chrono::duration<double>(Clock::now() - put_start).count());
    std::string dropped_bytes;
    records = RunPhase(clients, seconds, &started, &elapsed_s, [&] {
      std::this_thread::sleep_until(started + std::chrono::duration<double>(seconds / 3));
      grpc::ClientContext context;
      v1::DropSequenceRequest request;
      request.set_sequence_id("load-big");
      v1::DropSequenceResponse response;
      const Clock::time_point start = Clock::now();
      grpc::Status status = stub->DropSequence(&context, request, &response);
      const Clock::time_point end = Clock::now();
      drop_ms = std::chrono::duration<double, std::milli>(end - start).count();
      drop_from_s = std::chrono::duration<double>(start - started).count();
      drop_to_s = std::chrono::duration<double>(end - started).count();
      dropped_bytes =
          status.ok() ? absl::StrCat(response.bytes_dropped(), " bytes") : status.error_message();
    });
    phases.push_back(Summarize("drop", elapsed_s, records));
    Print(phases.back());
    std::printf("  DropSequence load-big (%s) took %.1f ms\n", dropped_bytes.c_str(), drop_ms);
    // The calls in flight while the store dropped it.
    phases.push_back(
        Summarize("during-drop", drop_to_s - drop_from_s, records, drop_from_s, drop_to_s));
    Print(phases.back());
  }

  const long peak_rss_kb = ProcStatus(pid, "VmHWM");
  const double peak_rss_mb = peak_rss_kb / 1024.0;
  // Default flags: --dram_budget_bytes 1 GiB, --max_inflight_put_bytes 512 MiB.
  const double rss_limit_mb = 1024 + 512 + 128;
  size_t calls = 0, errors = 0;
  double total_s = 0;
  for (const PhaseResult& phase : phases) {
    if (phase.name == "during-drop") continue;
    calls += phase.calls;
    errors += phase.errors;
    total_s += phase.seconds;
  }
  const PhaseResult& base = phases[0];
  double p99_ms = 0, idle_ratio = 0, drop_increase_ms = 0;
  for (int r = 0; r < 6; ++r) {
    p99_ms = std::max(p99_ms, base.rpcs[r].p99_ms);
    if (base.rpcs[r].p99_ms > 0) {
      idle_ratio = std::max(idle_ratio, phases[1].rpcs[r].p99_ms / base.rpcs[r].p99_ms);
    }
    if (drop_mib > 0) {
      drop_increase_ms = std::max(drop_increase_ms, phases[3].rpcs[r].p99_ms - base.rpcs[r].p99_ms);
    }
  }
  const bool errors_met = errors == 0;
  const bool idle_met = idle_ratio <= 2.0;
  const bool rss_met = peak_rss_mb <= rss_limit_mb;
  const bool drop_met = drop_mib == 0 || drop_increase_ms < 50;
  std::printf("server peak RSS (VmHWM) %.1f MiB\n", peak_rss_mb);
  std::printf("target: %d clients, 0 errors: %zu errors -> %s\n", num_clients, errors,
              errors_met ? "met" : "MISSED");
  std::printf("target: %d idle streams raise no p99 above 2x: worst ratio %.2f -> %s\n", num_idle,
              idle_ratio, idle_met ? "met" : "MISSED");
  std::printf(
      "target: peak RSS <= DRAM budget + in-flight limit + 128 MiB = %.0f MiB: %.1f -> %s\n",
      rss_limit_mb, peak_rss_mb, rss_met ? "met" : "MISSED");
  if (drop_mib > 0) {
    std::printf(
        "target: dropping %d MiB raises other calls' p99 by < 50 ms: worst +%.1f ms (calls in "
        "flight during the drop vs baseline) -> %s\n",
        drop_mib, drop_increase_ms, drop_met ? "met" : "MISSED");
  }
  {
    // Under the lock: a signal meanwhile waits for the stop, then removes the directory.
    absl::MutexLock lock(&RunCleanup().mu);
    if (absl::Status s = server.Stop(); !s.ok()) {
      std::printf("server stop: %s\n", std::string(s.message()).c_str());
      ++errors;
    }
    RunCleanup().server_pid = -1;
  }
  std::printf(
      "{\"rps\": %.1f, \"p99_ms\": %.2f, \"errors\": %zu, \"peak_rss_mb\": %.1f, \"clients\": %d, "
      "\"idle_streams\": %d, \"idle_p99_ratio\": %.2f, \"drop_mib\": %d, \"drop_ms\": %.1f, "
      "\"drop_p99_increase_ms\": %.1f, \"rss_limit_mb\": %.0f}\n",
      total_s > 0 ? calls / total_s : 0.0, p99_ms, errors, peak_rss_mb, num_clients, num_idle,
      idle_ratio, drop_mib, drop_ms, drop_increase_ms, rss_limit_mb);
  if (!absl::GetFlag(FLAGS_check)) return 0;
  if (absl::GetFlag(FLAGS_check_errors_only)) return errors == 0 ? 0 : 1;
  return errors_met && idle_met && rss_met && drop_met ? 0 : 1;
}

}  // namespace
}  // namespace kvstar::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  // Before any thread starts, so that every thread inherits the mask and only the cleanup
  // thread takes these signals.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  kvstar::bench::CleanUpOnTerminationSignals(signals);
  return kvstar::bench::Run();
}
