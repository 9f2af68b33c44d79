// store_bench: PutBlocks and GetBlocks throughput over loopback gRPC for each backend, beside the
// machine's memcpy bandwidth measured in the same run.
//
// The disk's own write+fsync rate is measured too: acknowledged puts are durable, so the disk,
// not memcpy, bounds them.
//
// For each backend it serves the real KvStoreService on 127.0.0.1 (in this process, so the bench
// needs no binary path), streams one sequence of a real model shape into it, and reads it back:
// once from the backend alone (no DRAM tier) and once through a DRAM tier that holds it all.
// Last line: JSON.
//
//   bazel run -c opt //bench:store_bench -- [--layers=28 --kv_heads=4 --head_dim=128 --tokens=4096]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/loopback_server.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "server/kvstore_service.h"
#include "storage/block_store.h"
#include "tests/integration/block_fixtures.h"

ABSL_FLAG(uint32_t, layers, 28, "Layers of the model.");
ABSL_FLAG(uint32_t, kv_heads, 4, "KV heads per layer.");
ABSL_FLAG(uint32_t, head_dim, 128, "Channels per head.");
ABSL_FLAG(uint32_t, tokens, 4096, "Tokens stored (a multiple of 128).");
ABSL_FLAG(uint32_t, blocks_per_message, 8, "Blocks per PutBlocks message.");
ABSL_FLAG(std::string, dir, "", "Where the stores live (default: a fresh temp directory).");

namespace kvstar {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Single-threaded memcpy over buffers far larger than the last-level cache: the ceiling for one
// gRPC stream, which copies every byte at least once on each side.
double MemcpyGbps() {
  const size_t bytes = size_t{512} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::memcpy(dst.data(), src.data(), bytes);  // touch pages
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    auto start = Clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    best = std::max(best, bytes / Seconds(start) / 1e9);
  }
  return best;
}

// Sequential write of a 256 MiB file in `dir` and one fsync, best of three: the most the disk
// under the durable backends can absorb durably — the ceiling for an acknowledged PutBlocks.
double DiskWriteGbps(const std::string& dir) {
  const std::string path = dir + "/disk-baseline";
  const size_t chunk = size_t{8} << 20, total = size_t{256} << 20;
  std::vector<char> buffer(chunk, 7);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto start = Clock::now();
    FILE* file = std::fopen(path.c_str(), "wb");
    if (file == nullptr) return 0;
    for (size_t written = 0; written < total; written += chunk) {
      std::fwrite(buffer.data(), 1, chunk, file);
    }
    std::fflush(file);
    fsync(fileno(file));
    std::fclose(file);
    best = std::max(best, total / Seconds(start) / 1e9);
    std::remove(path.c_str());
  }
  return best;
}

struct Result {
  double put_gbps = 0;
  double get_gbps = 0;       // backend only
  double get_dram_gbps = 0;  // through a DRAM tier holding the whole sequence
};

using bench::LoopbackServer;

// The service over `store` on loopback; exits on failure (a bench has nothing to fall back to).
std::unique_ptr<LoopbackServer> Serve(std::unique_ptr<storage::BlockStore> store) {
  absl::StatusOr<std::unique_ptr<LoopbackServer>> loopback =
      LoopbackServer::Start(std::move(store), server::ServiceOptions());
  if (!loopback.ok()) {
    std::fprintf(stderr, "%s\n", loopback.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(loopback);
}

double GetAllGbps(v1::KvStore::Stub& stub, uint64_t expected_blocks, uint64_t bytes) {
  auto start = Clock::now();
  grpc::ClientContext context;
  v1::GetBlocksRequest request;
  request.set_sequence_id("bench");
  auto reader = stub.GetBlocks(&context, request);
  v1::GetBlocksResponse reply;
  uint64_t blocks = 0;
  while (reader->Read(&reply)) blocks += reply.blocks_size();
  grpc::Status status = reader->Finish();
  double seconds = Seconds(start);
  if (!status.ok() || blocks != expected_blocks) {
    std::fprintf(stderr, "GetBlocks failed: %s (%llu blocks)\n", status.error_message().c_str(),
                 static_cast<unsigned long long>(blocks));
    std::exit(1);
  }
  return bytes / seconds / 1e9;
}

Result RunBackend(const std::string& backend, const std::string& dir) {
  const uint32_t layers = absl::GetFlag(FLAGS_layers);
  const uint32_t blocks_per_layer = absl::GetFlag(FLAGS_tokens) / 128;
  const uint64_t key_bytes =
      uint64_t{128} * absl::GetFlag(FLAGS_kv_heads) * absl::GetFlag(FLAGS_head_dim) * 2;
  const uint64_t total_blocks = uint64_t{layers} * blocks_per_layer;
  const uint64_t total_bytes = total_blocks * 2 * key_bytes;
  auto open = [&]() {
    auto store =
        backend == "nfs" ? storage::OpenPosixDirStore(dir) : storage::OpenRocksDbStore(dir);
    if (!store.ok()) {
      std::fprintf(stderr, "open %s: %s\n", dir.c_str(), store.status().ToString().c_str());
      std::exit(1);
    }
    return *std::move(store);
  };

  // Messages are built before the clock starts: the bench measures the service, not the fixture.
  std::vector<v1::PutBlocksRequest> messages;
  v1::PutBlocksRequest message;
  for (uint32_t layer = 0; layer < layers; ++layer) {
    for (uint32_t index = 0; index < blocks_per_layer; ++index) {
      message.set_sequence_id("bench");
      *message.add_blocks() = testing::MakeBlock(3, layer, index, key_bytes);
      if (message.blocks_size() == static_cast<int>(absl::GetFlag(FLAGS_blocks_per_message))) {
        messages.push_back(std::move(message));
        message.Clear();
      }
    }
  }
  if (message.blocks_size() > 0) messages.push_back(std::move(message));

  Result result;
  {
    std::unique_ptr<LoopbackServer> s = Serve(open());
    grpc::ClientContext context;
    v1::CreateSequenceRequest create;
    create.set_sequence_id("bench");
    v1::ModelProfile* profile = create.mutable_profile();
    profile->set_num_layers(layers);
    profile->set_num_q_heads(absl::GetFlag(FLAGS_kv_heads));
    profile->set_num_kv_heads(absl::GetFlag(FLAGS_kv_heads));
    profile->set_head_dim(absl::GetFlag(FLAGS_head_dim));
    profile->set_dtype(v1::DTYPE_BF16);
    v1::CreateSequenceResponse created;
    if (!s->stub().CreateSequence(&context, create, &created).ok()) std::exit(1);

    auto start = Clock::now();
    grpc::ClientContext put_context;
    v1::PutBlocksResponse put;
    auto writer = s->stub().PutBlocks(&put_context, &put);
    for (const auto& m : messages) writer->Write(m);
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (!status.ok() || put.bytes_written() != total_bytes) {
      std::fprintf(stderr, "PutBlocks failed: %s\n", status.error_message().c_str());
      std::exit(1);
    }
    result.put_gbps = total_bytes / Seconds(start) / 1e9;
    result.get_gbps = GetAllGbps(s->stub(), total_blocks, total_bytes);
  }
  {
    std::unique_ptr<LoopbackServer> s =
        Serve(storage::NewDramTier(open(), total_bytes + (64 << 20)));
    GetAllGbps(s->stub(), total_blocks, total_bytes);  // fills the DRAM tier
    result.get_dram_gbps = GetAllGbps(s->stub(), total_blocks, total_bytes);
  }
  std::printf("%-8s put %6.2f GB/s   get %6.2f GB/s   get via DRAM tier %6.2f GB/s   (%.0f MiB)\n",
              backend.c_str(), result.put_gbps, result.get_gbps, result.get_dram_gbps,
              total_bytes / 1048576.0);
  return result;
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string root = absl::GetFlag(FLAGS_dir);
  const bool own_root = root.empty();
  if (own_root) {
    char pattern[] = "/tmp/kvstar-store-bench.XXXXXX";
    root = mkdtemp(pattern);
  }
  const double memcpy_gbps = MemcpyGbps();
  const double disk_gbps = DiskWriteGbps(root);
  std::printf("memcpy (1 thread, 512 MiB): %.2f GB/s; disk write 256 MiB + fsync: %.2f GB/s\n",
              memcpy_gbps, disk_gbps);
  std::string json =
      absl::StrFormat("{\"memcpy_gbps\":%.3f,\"disk_write_gbps\":%.3f", memcpy_gbps, disk_gbps);
  for (const std::string backend : {"rocksdb", "nfs"}) {
    Result r = RunBackend(backend, root + "/" + backend);
    std::printf("%-8s ratio to memcpy: put %.3f  get %.3f  get via DRAM %.3f; put / disk %.2f\n",
                backend.c_str(), r.put_gbps / memcpy_gbps, r.get_gbps / memcpy_gbps,
                r.get_dram_gbps / memcpy_gbps, r.put_gbps / disk_gbps);
    absl::StrAppendFormat(&json,
                          ",\"%s\":{\"put_gbps\":%.3f,\"get_gbps\":%.3f,\"get_dram_gbps\":%.3f,"
                          "\"memcpy_gbps\":%.3f}",
                          backend, r.put_gbps, r.get_gbps, r.get_dram_gbps, memcpy_gbps);
  }
  std::printf("%s}\n", json.c_str());
  if (own_root) std::filesystem::remove_all(root);
  return 0;
}

}  // namespace
}  // namespace kvstar

int main(int argc, char** argv) { return kvstar::Main(argc, argv); }
