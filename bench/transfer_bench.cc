// transfer_bench: the client's data path against the link it runs on, measured in one run.
//   1. bulk pinned host->device copy (the baseline, GB/s);
//   2. scattered selected-block loads through the client's copy path for blocks of 64 KiB..1 MiB
//      into shuffled slots, as GB/s and as a ratio to bulk (target >= 0.8), naming the path the
//      client took (landing+scatter: one bulk copy into a device landing buffer and a scatter
//      kernel; batched memcpy: cudaMemcpyBatchAsync), checking the slots' bytes, and with each
//      path forced and one cudaMemcpyAsync per block beside it for reference;
//   3. the engine thread's time in RecordQuery + Acquire + Release per layer plus Step per layer
//      (target < 20 us), against an in-process server, with a decode step of --step_ms between
//      Step calls (a real model's step is ~20-30 ms), on the backend the client picks;
//   4. the two data planes against a real in-process kvstar server (memory store, shared-memory
//      segment): the same retrievals (same blocks, same queries, so the same selections) with new
//      blocks delivered through the segment and as gRPC bytes, timed from the Step that hands the
//      Retrieve over until its loads completed, as GB/s of block bytes delivered into slots and
//      their ratio; then where the shared-memory plane's retrievals spent their time, on the
//      client (segment wait, first reply, loads, later replies) and on the server (scoring, and
//      its sending thread's waiting, reading, copying into the segment, handing replies to gRPC).
// Without a GPU it says so, measures 3 and 4 on the host backend and exits 0. Last line: JSON.
//
//   bazel run -c opt //bench:transfer_bench -- [--bulk_mib=256] [--steps=400] [--step_ms=20]
// At model scale, the data path alone (Qwen2.5-14B 32K, every retrieval all new blocks):
//   transfer_bench --parts=planes --plane_layers=48 --plane_blocks=256 --shm_mib=8192
//       --plane_bytes=false [--plane_copy_threads=N --plane_retrieval_threads=N]
//       [--plane_resident: blocks kept in the segment as they are put, named without a copy]
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/loopback_server.h"
#include "client/device_backend.h"
#include "client/scatter_plan.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/client.h"
#include "server/kvstore_service.h"
#include "server/segment_handoff.h"
#include "server/tenant_segments.h"
#include "storage/block_store.h"
#include "tests/client/fake_kv_store.h"
#include "tests/integration/block_fixtures.h"

ABSL_FLAG(uint64_t, bulk_mib, 256, "Bytes moved per measurement, MiB.");
ABSL_FLAG(int, repeats, 5, "Repeats per measurement (the best is reported).");
ABSL_FLAG(int, steps, 200, "Decode steps timed for the critical path.");
ABSL_FLAG(uint32_t, layers, 16, "Layers of the model for the critical path.");
ABSL_FLAG(int, step_ms, 20, "Decode step's own compute between Step calls (critical path), ms.");
ABSL_FLAG(uint32_t, plane_layers, 8, "Layers of the model for the data-plane comparison.");
ABSL_FLAG(uint32_t, plane_blocks, 64, "Blocks per layer of each data-plane sequence.");
ABSL_FLAG(int, plane_retrievals, 12, "Retrievals timed per data plane.");
ABSL_FLAG(uint64_t, shm_mib, 256, "Shared-memory segment of the in-process server, MiB.");
ABSL_FLAG(bool, plane_bytes, true,
          "Also run the gRPC-bytes data plane (and the ratio); false: shared memory alone.");
ABSL_FLAG(
    size_t, plane_copy_threads, 0,
    "The in-process server's --copy_threads for the data planes (0: one per hardware thread).");
ABSL_FLAG(size_t, plane_retrieval_threads, 0,
          "The in-process server's --retrieval_threads for the data planes (0: all).");
ABSL_FLAG(bool, plane_resident, false,
          "The in-process server keeps the blocks in the segment as they are put "
          "(--segment_resident_blocks): Retrieve names them without copying.");
ABSL_FLAG(std::string, plane_server, "",
          "host:port of a running kvstar_server (memory backend, shared memory, no "
          "authentication) to measure the data planes against instead of the in-process one: "
          "the node in its own process, as deployed. Its thread and resident flags are its own.");
ABSL_FLAG(int, plane_busy_threads, 0,
          "Threads that spin on the CPU while the data planes are measured, as an inference "
          "engine's host threads do (busy-waiting on the GPU): the node's threads then share the "
          "cores.");
ABSL_FLAG(std::string, parts, "link,critical,planes",
          "Which measurements to run, comma-separated: link (needs a GPU), critical, planes.");

namespace {

using Clock = std::chrono::steady_clock;
using kvstar::client_internal::CopySegment;
using kvstar::client_internal::DeviceBackend;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool Check(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(error));
  return false;
}

// Best of `repeats` runs of `copy` (which enqueues on `stream`), in GB/s.
template <typename Copy>
double BestGbps(uint64_t bytes, int repeats, cudaStream_t stream, Copy copy) {
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    cudaStreamSynchronize(stream);
    const Clock::time_point start = Clock::now();
    copy();
    cudaStreamSynchronize(stream);
    best = std::max(best, bytes / Seconds(start) / 1e9);
  }
  return best;
}

struct SizeResult {
  uint64_t block_bytes = 0;
  std::string path;  // what the client's copy does for this size
  double client_gbps = 0;
  double landing_gbps = 0;  // forced: bulk copy into the landing buffer + scatter kernel
  double batched_gbps = 0;  // forced: cudaMemcpyBatchAsync, one descriptor per block
  double per_block_gbps = 0;
  bool verified = false;
};

struct LinkResults {
  double bulk_gbps = 0;
  double scattered_gbps = 0;  // the client's path at the smallest block size: the hardest case
  double ratio = 0;
  std::vector<SizeResult> sizes;
};

// How the client's copy path handles `segments`, in words.
std::string DescribePath(const std::vector<CopySegment>& segments,
                         const kvstar::client_internal::ScatterPlanOptions& options) {
  const kvstar::client_internal::ScatterPlan plan =
      kvstar::client_internal::PlanScatteredCopy(segments, options);
  if (plan.rounds.empty()) return absl::StrFormat("batched memcpy (%d copies)", plan.direct.size());
  size_t pieces = 0;
  for (const auto& round : plan.rounds) pieces += round.pieces.size();
  return absl::StrFormat("landing+scatter (%d bulk copies, %d blocks, %d direct)",
                         plan.rounds.size(), pieces, plan.direct.size());
}

LinkResults MeasureLink(DeviceBackend& backend) {
  using kvstar::client_internal::MakeCudaBackend;
  using kvstar::client_internal::ScatterPlanOptions;
  LinkResults results;
  const uint64_t bytes = absl::GetFlag(FLAGS_bulk_mib) << 20;
  const int repeats = absl::GetFlag(FLAGS_repeats);
  absl::StatusOr<void*> pinned = backend.AllocPinned(bytes);
  absl::StatusOr<void*> device = backend.AllocDevice(2 * bytes);
  absl::StatusOr<kvstar::client_internal::StreamHandle> stream_handle = backend.CreateStream();
  if (!pinned.ok() || !device.ok() || !stream_handle.ok()) {
    std::fprintf(stderr, "allocation failed\n");
    return results;
  }
  std::mt19937 random(7);
  {
    std::vector<uint32_t> words(bytes / 4);
    for (uint32_t& word : words) word = random();
    std::memcpy(*pinned, words.data(), bytes);
  }
  cudaStream_t stream = static_cast<cudaStream_t>(*stream_handle);
  results.bulk_gbps = BestGbps(bytes, repeats, stream, [&] {
    Check(cudaMemcpyAsync(*device, *pinned, bytes, cudaMemcpyHostToDevice, stream), "bulk");
  });
  std::printf("bulk pinned host->device: %.1f GB/s (%llu MiB)\n", results.bulk_gbps,
              static_cast<unsigned long long>(bytes >> 20));
  // The same copy forced down each path, each backend with its own stream (and landing buffer).
  ScatterPlanOptions landing_options;
  landing_options.direct_min_bytes = SIZE_MAX;
  ScatterPlanOptions batched_options;
  batched_options.direct_min_bytes = 0;
  std::unique_ptr<DeviceBackend> landing_backend = MakeCudaBackend(0, landing_options);
  std::unique_ptr<DeviceBackend> batched_backend = MakeCudaBackend(0, batched_options);
  absl::StatusOr<kvstar::client_internal::StreamHandle> landing_stream =
      landing_backend->CreateStream();
  absl::StatusOr<kvstar::client_internal::StreamHandle> batched_stream =
      batched_backend->CreateStream();
  if (!landing_stream.ok() || !batched_stream.ok()) {
    std::fprintf(stderr, "stream creation failed\n");
    return results;
  }
  auto timed = [&](DeviceBackend& with, kvstar::client_internal::StreamHandle on,
                   const std::vector<CopySegment>& segments) {
    return BestGbps(bytes, repeats, static_cast<cudaStream_t>(on), [&] {
      absl::Status status = with.CopyToDeviceBatch(segments.data(), segments.size(), on);
      if (!status.ok()) std::fprintf(stderr, "scattered copy: %s\n", status.ToString().c_str());
    });
  };
  for (uint64_t block = 64 << 10; block <= (1 << 20); block *= 2) {
    const uint64_t count = bytes / block;
    // Destinations: `count` of 2*count slots, shuffled (what selections look like); sources:
    // consecutive in one pinned buffer (how a load is staged).
    std::vector<uint64_t> slots(2 * count);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), random);
    std::vector<CopySegment> segments(count);
    for (uint64_t i = 0; i < count; ++i) {
      segments[i] = {static_cast<char*>(*device) + slots[i] * block,
                     static_cast<const char*>(*pinned) + i * block, block};
    }
    SizeResult size;
    size.block_bytes = block;
    size.path = DescribePath(segments, ScatterPlanOptions());
    size.client_gbps = timed(backend, *stream_handle, segments);
    // What the client's path left in the slots, checked block by block.
    std::vector<char> back(2 * bytes);
    Check(cudaMemcpy(back.data(), *device, back.size(), cudaMemcpyDeviceToHost), "verify copy");
    size.verified = true;
    for (uint64_t i = 0; i < count && size.verified; ++i) {
      size.verified = std::memcmp(back.data() + slots[i] * block,
                                  static_cast<const char*>(*pinned) + i * block, block) == 0;
    }
    size.landing_gbps = timed(*landing_backend, *landing_stream, segments);
    size.batched_gbps = timed(*batched_backend, *batched_stream, segments);
    size.per_block_gbps = BestGbps(bytes, repeats, stream, [&] {
      for (const CopySegment& segment : segments) {
        cudaMemcpyAsync(segment.dst, segment.src, segment.bytes, cudaMemcpyHostToDevice, stream);
      }
    });
    const double bulk = results.bulk_gbps;
    std::printf(
        "scattered %4llu KiB blocks: client %.1f GB/s (%.2f of bulk) via %s, %s; "
        "landing+scatter %.1f (%.2f), batched memcpy %.1f (%.2f), one copy per block "
        "%.1f (%.2f)\n",
        static_cast<unsigned long long>(block >> 10), size.client_gbps, size.client_gbps / bulk,
        size.path.c_str(), size.verified ? "slots verified" : "SLOTS WRONG", size.landing_gbps,
        size.landing_gbps / bulk, size.batched_gbps, size.batched_gbps / bulk, size.per_block_gbps,
        size.per_block_gbps / bulk);
    if (block == (64 << 10)) {
      results.scattered_gbps = size.client_gbps;
      results.ratio = size.client_gbps / bulk;
    }
    results.sizes.push_back(size);
  }
  landing_backend->DestroyStream(*landing_stream);
  batched_backend->DestroyStream(*batched_stream);
  backend.DestroyStream(*stream_handle);
  backend.FreeDevice(*device);
  backend.FreePinned(*pinned);
  return results;
}

// Microseconds the engine thread spends per layer per step in the client's per-step calls.
double MeasureCriticalPath(kvstar::BackendKind backend_kind, std::string* backend_name,
                           int* max_staleness) {
  kvstar::testing::FakeKvStore server;
  const uint32_t stride = 8;
  // 16 middle blocks of which 3 change every retrieval (~20% of the resident set, as DESIGN §4).
  server.set_selector([](uint32_t, uint32_t num_blocks, uint64_t step) {
    std::vector<uint32_t> blocks = {0};
    for (uint32_t i = 0; i < 13; ++i) blocks.push_back(1 + 3 * i);
    for (uint32_t j = 0; j < 3; ++j) {
      blocks.push_back(2 + static_cast<uint32_t>((step / 8 * 3 + j) % (num_blocks - 4)));
    }
    blocks.push_back(num_blocks - 2);
    blocks.push_back(num_blocks - 1);
    std::sort(blocks.begin(), blocks.end());
    blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
    return blocks;
  });
  kvstar::ClientOptions options;
  options.address = server.address();
  options.backend = backend_kind;
  absl::StatusOr<std::unique_ptr<kvstar::Client>> client = kvstar::Client::Connect(options);
  if (!client.ok()) {
    std::fprintf(stderr, "connect: %s\n", client.status().ToString().c_str());
    return -1;
  }
  *backend_name = kvstar::BackendName((*client)->backend());
  kvstar::ModelProfile profile;
  profile.num_layers = absl::GetFlag(FLAGS_layers);
  profile.num_q_heads = 32;
  profile.num_kv_heads = 8;
  profile.head_dim = 128;
  profile.dtype = kvstar::DType::kBf16;
  kvstar::KvstarConfig config;
  config.retrieval_stride = stride;
  const uint32_t blocks = 64;
  absl::StatusOr<kvstar::Sequence*> sequence =
      (*client)->CreateSequence("bench", profile, config, {0, blocks + 16});
  if (!sequence.ok()) {
    std::fprintf(stderr, "create: %s\n", sequence.status().ToString().c_str());
    return -1;
  }
  const uint64_t key_bytes = profile.block_key_bytes();
  std::string key(key_bytes, '\0'), value(key_bytes, '\0');
  kvstar::testing::FillPseudoRandom(1, &key);
  kvstar::testing::FillPseudoRandom(2, &value);
  for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
    for (uint32_t index = 0; index < blocks; ++index) {
      (*sequence)
          ->Offload(layer, index, key.data(), value.data(), kvstar::MemoryKind::kHost, nullptr)
          .IgnoreError();
    }
  }
  std::string queries(profile.num_layers * stride * profile.query_bytes(), '\0');
  absl::Status sealed =
      (*sequence)->Seal(queries.data(), stride, kvstar::MemoryKind::kHost, nullptr);
  if (!sealed.ok()) {
    std::fprintf(stderr, "seal: %s\n", sealed.ToString().c_str());
    return -1;
  }
  // Queries live where the engine has them: device memory on CUDA.
  void* query = nullptr;
  kvstar::MemoryKind where = kvstar::MemoryKind::kHost;
  std::vector<char> host_query(profile.query_bytes(), 0);
  cudaStream_t stream = nullptr;
  if ((*client)->backend() == kvstar::BackendKind::kCuda) {
    cudaMalloc(&query, profile.query_bytes());
    cudaMemset(query, 0, profile.query_bytes());
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    where = kvstar::MemoryKind::kDevice;
  } else {
    query = host_query.data();
  }
  const int steps = absl::GetFlag(FLAGS_steps);
  double engine_seconds = 0;
  for (int step = 0; step < steps; ++step) {
    const Clock::time_point start = Clock::now();
    for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
      absl::StatusOr<kvstar::SlotTable> table = (*sequence)->Acquire(layer, stream);
      if (!table.ok()) return -1;
      (*sequence)->RecordQuery(layer, query, where, stream).IgnoreError();
      (*sequence)->Release(layer, stream).IgnoreError();
    }
    (*client)->Step().IgnoreError();
    engine_seconds += Seconds(start);
    // The decode step's own compute, during which loads proceed.
    std::this_thread::sleep_for(std::chrono::milliseconds(absl::GetFlag(FLAGS_step_ms)));
  }
  const kvstar::SequenceStats stats = (*sequence)->stats();
  const kvstar::ClientStats client_stats = (*client)->stats();
  std::printf(
      "critical path (%s backend, %u layers, %d steps of %d ms): %.2f us per layer; "
      "%llu selections published, max staleness %llu steps (stride %u); %llu retrievals "
      "sent, %llu skipped (previous still in flight), %llu selections dropped\n",
      backend_name->c_str(), profile.num_layers, steps, absl::GetFlag(FLAGS_step_ms),
      engine_seconds * 1e6 / (double{1} * steps * profile.num_layers),
      static_cast<unsigned long long>(stats.selections_published),
      static_cast<unsigned long long>(stats.max_staleness_steps), stride,
      static_cast<unsigned long long>(client_stats.retrievals_sent),
      static_cast<unsigned long long>(client_stats.retrievals_skipped),
      static_cast<unsigned long long>(stats.selections_dropped));
  *max_staleness = static_cast<int>(stats.max_staleness_steps);
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    cudaFree(query);
  }
  return engine_seconds * 1e6 / (double{1} * steps * profile.num_layers);
}

// One client of the data-plane server with its sequence (the same blocks in both planes).
struct PlaneRun {
  kvstar::DataPlane requested = kvstar::DataPlane::kAuto;
  std::unique_ptr<kvstar::Client> client;
  kvstar::Sequence* sequence = nullptr;
  uint64_t decode_step = 0;
  double seconds = 0;  // timed retrievals, from hand-over to loads complete
  uint64_t bytes = 0;  // block bytes delivered into slots by them
  uint64_t blocks = 0;
  int retrievals = 0;
};

struct PlaneResult {
  bool ok = false;
  std::string backend;
  double shm_gbps = 0;
  double grpc_bytes_gbps = 0;
  bool same_selections = false;
};

// Finite bf16 values of either sign below 2 (clears the top exponent bit of each element), so the
// server's scores are numbers and vary with the queries.
void Tame(std::string* bytes) {
  for (size_t i = 1; i < bytes->size(); i += 2) (*bytes)[i] &= static_cast<char>(0xbf);
}

std::string PlaneQueries(const kvstar::ModelProfile& profile, uint32_t rows, uint64_t seed) {
  std::string queries(uint64_t{profile.num_layers} * rows * profile.query_bytes(), '\0');
  kvstar::testing::FillPseudoRandom(seed, &queries);
  Tame(&queries);
  return queries;
}

absl::Status StartPlaneRun(const std::string& address, const std::string& id,
                           const kvstar::ModelProfile& profile, const kvstar::KvstarConfig& config,
                           uint32_t blocks, PlaneRun* run) {
  kvstar::ClientOptions options;
  options.address = address;
  options.data_plane = run->requested;
  absl::StatusOr<std::unique_ptr<kvstar::Client>> client = kvstar::Client::Connect(options);
  if (!client.ok()) return client.status();
  run->client = *std::move(client);
  absl::StatusOr<kvstar::Sequence*> sequence =
      run->client->CreateSequence(id, profile, config, {0, blocks + 16});
  if (!sequence.ok()) return sequence.status();
  run->sequence = *sequence;
  const uint64_t key_bytes = profile.block_key_bytes();
  std::string key(key_bytes, '\0'), value(key_bytes, '\0');
  for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
    for (uint32_t index = 0; index < blocks; ++index) {
      kvstar::testing::FillPseudoRandom(2 * (uint64_t{layer} * blocks + index), &key);
      kvstar::testing::FillPseudoRandom(2 * (uint64_t{layer} * blocks + index) + 1, &value);
      Tame(&key);
      Tame(&value);
      absl::Status status = run->sequence->Offload(layer, index, key.data(), value.data(),
                                                   kvstar::MemoryKind::kHost, nullptr);
      if (!status.ok()) return status;
    }
  }
  const std::string queries = PlaneQueries(profile, config.retrieval_stride, 1);
  return run->sequence->Seal(queries.data(), config.retrieval_stride, kvstar::MemoryKind::kHost,
                             nullptr);
}

// One window of decode steps ending in a retrieval; times the retrieval from the Step that hands
// it over until its loads completed (and adds it to the run's totals when `timed`).
absl::Status DecodeWindow(const kvstar::ModelProfile& profile, uint32_t stride, bool timed,
                          PlaneRun* run) {
  for (uint32_t i = 0; i < stride; ++i) {
    const std::string query = PlaneQueries(profile, 1, 1000 + run->decode_step);
    for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
      absl::StatusOr<kvstar::SlotTable> table = run->sequence->Acquire(layer, nullptr);
      if (!table.ok()) return table.status();
      const char* row = query.data() + layer * profile.query_bytes();
      absl::Status status =
          run->sequence->RecordQuery(layer, row, kvstar::MemoryKind::kHost, nullptr);
      if (status.ok()) status = run->sequence->Release(layer, nullptr);
      if (!status.ok()) return status;
    }
    ++run->decode_step;
    const bool retrieves = i + 1 == stride;
    const uint64_t completed = run->client->stats().retrievals_completed;
    const uint64_t loaded_bytes = run->sequence->stats().bytes_loaded;
    const uint64_t loaded_blocks = run->sequence->stats().blocks_loaded;
    const Clock::time_point start = Clock::now();
    if (absl::Status status = run->client->Step(); !status.ok()) return status;
    if (!retrieves) continue;
    while (run->client->stats().retrievals_completed == completed) {
      if (Seconds(start) > 60) return absl::DeadlineExceededError("retrieval did not complete");
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    if (run->client->backend() == kvstar::BackendKind::kCuda) cudaDeviceSynchronize();
    if (timed) {
      run->seconds += Seconds(start);
      run->bytes += run->sequence->stats().bytes_loaded - loaded_bytes;
      run->blocks += run->sequence->stats().blocks_loaded - loaded_blocks;
      ++run->retrievals;
    }
  }
  return absl::OkStatus();
}

kvstar::v1::StatsResponse ServerStats(kvstar::v1::KvStore::Stub& stub) {
  grpc::ClientContext context;
  kvstar::v1::StatsResponse response;
  grpc::Status status = stub.Stats(&context, kvstar::v1::StatsRequest(), &response);
  if (!status.ok()) std::fprintf(stderr, "Stats: %s\n", status.error_message().c_str());
  return response;
}

// Where the shared-memory plane's timed retrievals spent their time, on both sides: the client's
// account (ClientStats) and the server's (Stats' retrieve_*_micros over the timed windows, which
// cover every plane's retrievals: `planes` of them run alternately, so their sum is divided out
// only when one ran).
void PrintRetrieveTimes(const PlaneRun& run, const kvstar::v1::StatsResponse& before,
                        const kvstar::v1::StatsResponse& after, size_t planes) {
  const kvstar::ClientStats c = run.client->stats();
  const double calls = std::max<uint64_t>(1, c.retrievals_completed);
  std::printf(
      "client, per retrieval (all %llu): %.2f ms in all = segment wait %.2f + first reply %.2f + "
      "loads %.2f + waiting for later replies %.2f (of which the call's end after the last reply "
      "%.2f)\n",
      static_cast<unsigned long long>(c.retrievals_completed), c.retrieve_micros / calls / 1e3,
      c.segment_wait_micros / calls / 1e3, c.first_reply_micros / calls / 1e3,
      c.load_micros / calls / 1e3,
      (double(c.retrieve_micros) - c.segment_wait_micros - c.first_reply_micros - c.load_micros) /
          calls / 1e3,
      c.call_end_micros / calls / 1e3);
  const double n = std::max<uint64_t>(1, after.retrievals() - before.retrievals());
  auto ms = [&](uint64_t a, uint64_t b) { return (double(a) - double(b)) / n / 1e3; };
  std::printf(
      "server, per timed retrieval (%.0f%s): %.2f ms in all; scoring %.2f (overlapped); sending "
      "thread: waiting for scores %.2f, reading %.2f, copying into the segment %.2f, handing "
      "replies to gRPC %.2f\n",
      n, planes > 1 ? ", both planes" : "", ms(after.retrieve_micros(), before.retrieve_micros()),
      ms(after.retrieve_score_micros(), before.retrieve_score_micros()),
      ms(after.retrieve_wait_micros(), before.retrieve_wait_micros()),
      ms(after.retrieve_read_micros(), before.retrieve_read_micros()),
      ms(after.retrieve_copy_micros(), before.retrieve_copy_micros()),
      ms(after.retrieve_send_micros(), before.retrieve_send_micros()));
}

// Shared-memory vs gRPC-bytes delivery of the same retrievals against a real in-process server.
PlaneResult MeasureDataPlanes() {
  PlaneResult result;
  // One tenant ("default", no authentication) with the whole segment, handed over a socket.
  const uint64_t shm_bytes = absl::GetFlag(FLAGS_shm_mib) << 20;
  kvstar::server::TenantSegments segments(shm_bytes, shm_bytes);
  absl::StatusOr<std::unique_ptr<kvstar::server::SegmentHandoff>> handoff =
      kvstar::server::SegmentHandoff::Start(
          "",
          [](absl::string_view) -> absl::StatusOr<std::string> {
            return std::string(kvstar::server::kDefaultTenant);
          },
          &segments);
  if (!handoff.ok()) {
    std::fprintf(stderr, "shared-memory socket: %s\n", handoff.status().ToString().c_str());
    return result;
  }
  kvstar::server::ServiceOptions service_options;
  service_options.shared_memory = &segments;
  service_options.shared_memory_socket = (*handoff)->address();
  service_options.copy_threads = absl::GetFlag(FLAGS_plane_copy_threads);
  service_options.retrieval_threads = absl::GetFlag(FLAGS_plane_retrieval_threads);
  service_options.segment_resident_blocks = absl::GetFlag(FLAGS_plane_resident);
  // Declared after the segments (which must outlive it) and before the clients (which go first).
  std::unique_ptr<kvstar::bench::LoopbackServer> loopback;
  std::unique_ptr<kvstar::v1::KvStore::Stub> external;
  std::string address = absl::GetFlag(FLAGS_plane_server);
  if (address.empty()) {
    absl::StatusOr<std::unique_ptr<kvstar::bench::LoopbackServer>> started =
        kvstar::bench::LoopbackServer::Start(kvstar::storage::NewMemoryStore(), service_options);
    if (!started.ok()) {
      std::fprintf(stderr, "in-process server: %s\n", started.status().ToString().c_str());
      return result;
    }
    loopback = *std::move(started);
    address = loopback->address();
  } else {
    external = kvstar::v1::KvStore::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }
  kvstar::v1::KvStore::Stub& stats_stub = loopback ? loopback->stub() : *external;

  kvstar::ModelProfile profile;  // a Qwen2.5-14B layer: 8 KV heads of 128, bf16, 128-token blocks
  profile.num_layers = absl::GetFlag(FLAGS_plane_layers);
  profile.num_q_heads = 40;
  profile.num_kv_heads = 8;
  profile.head_dim = 128;
  profile.dtype = kvstar::DType::kBf16;
  kvstar::KvstarConfig config;
  config.retrieval_stride = 8;
  const uint32_t blocks = absl::GetFlag(FLAGS_plane_blocks);
  PlaneRun shm, grpc_bytes;
  shm.requested = kvstar::DataPlane::kSharedMemory;
  grpc_bytes.requested = kvstar::DataPlane::kGrpcBytes;
  std::vector<PlaneRun*> runs = {&shm};
  if (absl::GetFlag(FLAGS_plane_bytes)) runs.push_back(&grpc_bytes);
  for (PlaneRun* run : runs) {
    const char* id = run == &shm ? "plane-shm" : "plane-bytes";
    absl::Status status = StartPlaneRun(address, id, profile, config, blocks, run);
    if (!status.ok()) {
      std::fprintf(stderr, "data plane %s: %s\n", kvstar::DataPlaneName(run->requested),
                   status.ToString().c_str());
      return result;
    }
  }
  result.backend = kvstar::BackendName(shm.client->backend());
  // Alternating windows, so both planes see the machine in the same state; the first is warm-up.
  const int retrievals = absl::GetFlag(FLAGS_plane_retrievals);
  // The engine's busy host threads, if asked for, from the first window to the last.
  std::atomic<bool> busy_stop{false};
  std::vector<std::thread> busy;
  for (int t = 0; t < absl::GetFlag(FLAGS_plane_busy_threads); ++t) {
    busy.emplace_back([&busy_stop] {
      while (!busy_stop.load(std::memory_order_relaxed)) {
      }
    });
  }
  auto stop_busy = absl::MakeCleanup([&] {
    busy_stop.store(true);
    for (std::thread& thread : busy) thread.join();
  });
  kvstar::v1::StatsResponse server_before;
  for (int r = 0; r <= retrievals; ++r) {
    if (r == 1) server_before = ServerStats(stats_stub);
    for (PlaneRun* run : runs) {
      absl::Status status = DecodeWindow(profile, config.retrieval_stride, r > 0, run);
      if (!status.ok()) {
        std::fprintf(stderr, "data plane %s, retrieval %d: %s\n",
                     kvstar::DataPlaneName(run->requested), r, status.ToString().c_str());
        return result;
      }
    }
  }
  const kvstar::v1::StatsResponse server_after = ServerStats(stats_stub);
  std::move(stop_busy).Invoke();
  for (PlaneRun* run : runs) {
    const kvstar::ClientStats stats = run->client->stats();
    const double gbps = run->seconds > 0 ? run->bytes / run->seconds / 1e9 : 0;
    std::printf(
        "data plane %s (%s backend, %u layers x %u blocks of %llu KiB K+V, stride %u, %d busy "
        "threads): %d "
        "retrievals, %.1f blocks and %.1f MiB into slots each, %.2f ms each from Step to loaded: "
        "%.2f GB/s; blocks received %llu via shared memory, %llu as bytes\n",
        kvstar::DataPlaneName(run->client->data_plane()), result.backend.c_str(),
        profile.num_layers, blocks,
        static_cast<unsigned long long>(2 * profile.block_key_bytes() >> 10),
        config.retrieval_stride, absl::GetFlag(FLAGS_plane_busy_threads), run->retrievals,
        double(run->blocks) / std::max(1, run->retrievals),
        run->bytes / 1048576.0 / std::max(1, run->retrievals),
        run->seconds * 1e3 / std::max(1, run->retrievals), gbps,
        static_cast<unsigned long long>(stats.blocks_received_shared),
        static_cast<unsigned long long>(stats.blocks_received_bytes));
  }
  PrintRetrieveTimes(shm, server_before, server_after, runs.size());
  result.shm_gbps = shm.bytes / std::max(shm.seconds, 1e-9) / 1e9;
  result.grpc_bytes_gbps = grpc_bytes.bytes / std::max(grpc_bytes.seconds, 1e-9) / 1e9;
  if (runs.size() == 1) {
    result.same_selections = true;  // nothing to compare
  } else {
    result.same_selections = shm.bytes == grpc_bytes.bytes && shm.blocks == grpc_bytes.blocks;
    std::printf("data planes: shared memory / gRPC bytes = %.2f (same selections: %s)\n",
                result.shm_gbps / std::max(result.grpc_bytes_gbps, 1e-9),
                result.same_selections ? "yes" : "NO");
  }
  result.ok = shm.client->data_plane() == kvstar::DataPlane::kSharedMemory && shm.bytes > 0;
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::set<std::string> parts;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_parts), ',')) {
    if (part != "link" && part != "critical" && part != "planes") {
      std::fprintf(stderr, "--parts: unknown part \"%s\" (link, critical, planes)\n",
                   std::string(part).c_str());
      return 2;
    }
    parts.insert(std::string(part));
  }
  absl::Status cuda = kvstar::client_internal::CudaUsable(0);
  LinkResults link;
  if (cuda.ok() && parts.count("link")) {
    absl::StatusOr<std::unique_ptr<DeviceBackend>> backend =
        kvstar::client_internal::SelectBackend(kvstar::BackendKind::kCuda, 0);
    if (!backend.ok()) return 1;
    link = MeasureLink(**backend);
  } else if (!cuda.ok()) {
    std::printf(
        "transfer_bench needs a GPU for the link measurements (%s); measuring the "
        "host-backend critical path and data planes only\n",
        std::string(cuda.message()).c_str());
  }
  std::string backend_name;
  int max_staleness = -1;
  const double critical_us =
      parts.count("critical")
          ? MeasureCriticalPath(kvstar::BackendKind::kAuto, &backend_name, &max_staleness)
          : 0;
  PlaneResult planes;
  if (parts.count("planes")) {
    planes = MeasureDataPlanes();
  } else {
    planes.ok = planes.same_selections = true;  // not measured
  }
  std::string per_size;
  bool verified = true;
  for (const SizeResult& size : link.sizes) {
    absl::StrAppendFormat(&per_size,
                          "%s\"%d\": {\"ratio\": %.3f, \"path\": \"%s\", "
                          "\"landing_ratio\": %.3f, \"batched_ratio\": %.3f}",
                          per_size.empty() ? "" : ", ", size.block_bytes >> 10,
                          size.client_gbps / link.bulk_gbps,
                          size.path.substr(0, size.path.find(' ')),
                          size.landing_gbps / link.bulk_gbps, size.batched_gbps / link.bulk_gbps);
    verified = verified && size.verified;
  }
  std::printf("%s\n",
              absl::StrFormat("{\"gpu\": %s, \"backend\": \"%s\", \"bulk_h2d_gbps\": %.2f, "
                              "\"scattered_h2d_gbps\": %.2f, \"ratio\": %.3f, "
                              "\"critical_path_us_per_layer\": %.3f, \"max_staleness_steps\": %d, "
                              "\"slots_verified\": %s, \"ratios_by_block_kib\": {%s}, "
                              "\"step_ms\": %d, \"shm_gbps\": %.3f, \"grpc_bytes_gbps\": %.3f, "
                              "\"shm_over_grpc_bytes\": %.3f}",
                              cuda.ok() ? "true" : "false", backend_name, link.bulk_gbps,
                              link.scattered_gbps, link.ratio, critical_us, max_staleness,
                              verified ? "true" : "false", per_size, absl::GetFlag(FLAGS_step_ms),
                              planes.shm_gbps, planes.grpc_bytes_gbps,
                              planes.shm_gbps / std::max(planes.grpc_bytes_gbps, 1e-9))
                  .c_str());
  if (!verified || !planes.ok || !planes.same_selections) return 1;
  return critical_us < 0 ? 1 : 0;
}
