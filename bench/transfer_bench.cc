// transfer_bench: the client's data path against the link it runs on, measured in one run.
//   1. bulk pinned host->device copy (the baseline, GB/s);
//   2. scattered selected-block loads through the client's copy path for blocks of 64 KiB..1 MiB
//      into shuffled slots, as GB/s and as a ratio to bulk (target >= 0.8), naming the path the
//      client took (landing+scatter: one bulk copy into a device landing buffer and a scatter
//      kernel; batched memcpy: cudaMemcpyBatchAsync), checking the slots' bytes, and with each
//      path forced and one cudaMemcpyAsync per block beside it for reference;
//   3. the engine thread's time in RecordQuery + Acquire + Release per layer plus Step per layer
//      (target < 20 us), against an in-process server, on the backend the client picks.
// Without a GPU it says so, measures 3 on the host backend and exits 0. Last line: JSON.
//
//   bazel run -c opt //bench:transfer_bench -- [--bulk_mib=256] [--steps=400]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/device_backend.h"
#include "client/scatter_plan.h"
#include "kvstar/client.h"
#include "tests/client/fake_kv_store.h"
#include "tests/integration/block_fixtures.h"

ABSL_FLAG(uint64_t, bulk_mib, 256, "Bytes moved per measurement, MiB.");
ABSL_FLAG(int, repeats, 5, "Repeats per measurement (the best is reported).");
ABSL_FLAG(int, steps, 200, "Decode steps timed for the critical path.");
ABSL_FLAG(uint32_t, layers, 16, "Layers of the model for the critical path.");

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
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const kvstar::SequenceStats stats = (*sequence)->stats();
  const kvstar::ClientStats client_stats = (*client)->stats();
  std::printf(
      "critical path (%s backend, %u layers, %d steps): %.2f us per layer; "
      "%llu selections published, max staleness %llu steps (stride %u); %llu retrievals "
      "sent, %llu skipped (previous still in flight), %llu selections dropped\n",
      backend_name->c_str(), profile.num_layers, steps,
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

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status cuda = kvstar::client_internal::CudaUsable(0);
  LinkResults link;
  if (cuda.ok()) {
    absl::StatusOr<std::unique_ptr<DeviceBackend>> backend =
        kvstar::client_internal::SelectBackend(kvstar::BackendKind::kCuda, 0);
    if (!backend.ok()) return 1;
    link = MeasureLink(**backend);
  } else {
    std::printf(
        "transfer_bench needs a GPU for the link measurements (%s); measuring the "
        "host-backend critical path only\n",
        std::string(cuda.message()).c_str());
  }
  std::string backend_name;
  int max_staleness = -1;
  const double critical_us =
      MeasureCriticalPath(kvstar::BackendKind::kAuto, &backend_name, &max_staleness);
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
                              "\"slots_verified\": %s, \"ratios_by_block_kib\": {%s}}",
                              cuda.ok() ? "true" : "false", backend_name, link.bulk_gbps,
                              link.scattered_gbps, link.ratio, critical_us, max_staleness,
                              verified ? "true" : "false", per_size)
                  .c_str());
  if (!verified) return 1;
  return critical_us < 0 ? 1 : 0;
}
