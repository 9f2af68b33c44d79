// The storage node's Retrieve data path with shared memory, in process (no gRPC, memory store):
// how long a retrieval takes when every selected block is new to the client (the worst case, a
// topic change), how many bytes it moves into the tenant's segment, and how that scales with
// --copy_threads; against a retrieval that ships no data (scoring alone) and against memcpy on
// one thread and on all the copy threads (plain and streaming copies, and memset), all measured
// in the same run. Each retrieval also releases the previous one's regions, as a client's next
// Retrieve does.
//
//   bazel run -c opt //bench:node_data_path -- --layers=48 --q_heads=40 --kv_heads=8
//       --context=32768 --copy_threads=1,4,8 --retrievals=8
//
// The last line is JSON: per copy-thread count the ms per retrieval and the GB it moved.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "retrieval/thread_pool.h"
#include "server/shared_memory_arena.h"
#include "server/storage_node.h"
#include "server/tenant_segments.h"
#include "storage/block_store.h"

ABSL_FLAG(int, layers, 48, "layers (Qwen2.5-14B: 48)");
ABSL_FLAG(int, q_heads, 40, "query heads");
ABSL_FLAG(int, kv_heads, 8, "KV heads");
ABSL_FLAG(int, head_dim, 128, "head dimension");
ABSL_FLAG(int, block_size, 128, "tokens per block");
ABSL_FLAG(int, context, 8192, "tokens per sequence");
ABSL_FLAG(double, sparse_ratio, 0.25, "fraction of the middle blocks selected");
ABSL_FLAG(std::string, copy_threads, "1,4", "copy-thread counts to measure, comma-separated");
ABSL_FLAG(int, retrieval_threads, 0, "scoring threads (0: one per hardware thread)");
ABSL_FLAG(int, retrievals, 6, "timed retrievals per configuration (after one warm-up)");

namespace kvstar::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr char kTenant[] = "bench";
constexpr char kSequence[] = "seq";

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void Check(const absl::Status& status, const char* what) {
  if (status.ok()) return;
  std::fprintf(stderr, "node_data_path: %s: %s\n", what, status.ToString().c_str());
  std::exit(1);
}

struct Setup {
  v1::ModelProfile profile;
  v1::KvstarConfig config;
  uint32_t blocks = 0;  // per layer
  uint64_t block_key_bytes = 0;
};

// Random bf16 bits of modest magnitude: exponents near 1, any sign and mantissa.
void FillBf16(std::mt19937_64& rng, uint8_t* out, size_t bytes) {
  for (size_t i = 0; i + 1 < bytes; i += 2) {
    const uint64_t r = rng();
    const uint16_t bits =
        static_cast<uint16_t>(((r & 1) << 15) | ((0x7c + (r >> 1) % 4) << 7) | ((r >> 8) & 0x7f));
    std::memcpy(out + i, &bits, 2);
  }
}

void AddQueries(const Setup& setup, std::mt19937_64& rng, uint32_t num_queries,
                google::protobuf::RepeatedPtrField<v1::LayerQueries>* out) {
  const size_t bytes =
      size_t{num_queries} * setup.profile.num_q_heads() * setup.profile.head_dim() * 2;
  std::string queries(bytes, '\0');
  for (uint32_t layer = 0; layer < setup.profile.num_layers(); ++layer) {
    FillBf16(rng, reinterpret_cast<uint8_t*>(queries.data()), bytes);
    v1::LayerQueries* q = out->Add();
    q->set_layer(layer);
    q->set_num_queries(num_queries);
    q->set_queries(queries);
  }
}

// Stores the sequence once; a distinct random K per (layer, block) out of a pool of 64, V = K.
void Fill(server::StorageNode& node, const Setup& setup) {
  Check(node.CreateSequence(kTenant, kSequence, setup.profile, setup.config).status(), "Create");
  std::mt19937_64 rng(7);
  std::vector<std::string> pool(64, std::string(setup.block_key_bytes, '\0'));
  for (std::string& k : pool) FillBf16(rng, reinterpret_cast<uint8_t*>(k.data()), k.size());
  std::unique_ptr<server::PutStream> put = node.NewPutStream(kTenant);
  for (uint32_t layer = 0; layer < setup.profile.num_layers(); ++layer) {
    std::vector<storage::BlockData> message;
    for (uint32_t b = 0; b < setup.blocks; ++b) {
      const std::string& k = pool[rng() % pool.size()];
      message.push_back({{layer, b}, k, k, storage::BlockChecksum(k, k)});
    }
    Check(put->Add(kSequence, std::move(message)), "PutBlocks");
  }
  Check(put->Flush(), "PutBlocks flush");
}

struct Measured {
  double ms = 0;          // per retrieval, median
  double gb_moved = 0;    // per retrieval, into the segment
  uint64_t blocks = 0;    // per retrieval
  uint64_t as_bytes = 0;  // blocks that did not fit the segment
};

Measured Run(server::StorageNode& node, const Setup& setup, bool include_data, int retrievals,
             uint64_t* step) {
  std::mt19937_64 rng(11);
  std::vector<double> times;
  Measured result;
  for (int call = 0; call <= retrievals; ++call) {
    v1::RetrieveRequest request;
    v1::SequenceQueries* part = request.add_sequences();
    part->set_sequence_id(kSequence);
    *step += setup.config.retrieval_stride();
    part->set_decode_step(*step);
    part->set_include_data(include_data);
    part->set_shared_memory(include_data);
    AddQueries(setup, rng, setup.config.retrieval_stride(), part->mutable_queries());
    uint64_t bytes = 0, blocks = 0, as_bytes = 0;
    const Clock::time_point start = Clock::now();
    Check(node.Retrieve(
              kTenant, request,
              [&](server::RetrievedLayer& layer) {
                blocks += layer.shared_blocks.size() + layer.blocks.size();
                as_bytes += layer.blocks.size();
                for (const server::SharedBlockRef& ref : layer.shared_blocks) {
                  bytes += 2 * ref.key_length;
                }
                return true;
              },
              [] { return false; }),
          "Retrieve");
    if (call == 0) continue;  // warm-up: the first retrieval frees nothing
    times.push_back(Seconds(start) * 1e3);
    result.gb_moved = bytes / 1e9;
    result.blocks = blocks;
    result.as_bytes = as_bytes;
  }
  std::sort(times.begin(), times.end());
  result.ms = times[times.size() / 2];
  return result;
}

enum class Pass { kMemcpy, kStreaming, kMemset };

// GB/s of one pass over `bytes` (memcpy or the segment's streaming copy between two buffers, or
// memset of one) on `threads` threads, in chunks of 256 KiB (a block's K).
double PassGbps(size_t bytes, size_t threads, Pass pass) {
  std::vector<char> from(bytes, 1), to(bytes, 0);
  retrieval::ThreadPool pool(threads);
  constexpr size_t kChunk = 256 << 10;
  const size_t chunks = (bytes + kChunk - 1) / kChunk;
  auto copy = [&] {
    pool.ParallelFor(chunks, [&](size_t i, size_t) {
      const size_t begin = i * kChunk;
      const size_t n = std::min(kChunk, bytes - begin);
      switch (pass) {
        case Pass::kMemcpy:
          std::memcpy(to.data() + begin, from.data() + begin, n);
          break;
        case Pass::kStreaming:
          server::CopyToSegment(to.data() + begin, from.data() + begin, n);
          break;
        case Pass::kMemset:
          std::memset(to.data() + begin, 0, n);
          break;
      }
    });
  };
  copy();  // fault the pages in
  const Clock::time_point start = Clock::now();
  constexpr int kRounds = 3;
  for (int r = 0; r < kRounds; ++r) copy();
  return kRounds * bytes / Seconds(start) / 1e9;
}

int Main() {
  Setup setup;
  v1::ModelProfile& p = setup.profile;
  p.set_num_layers(absl::GetFlag(FLAGS_layers));
  p.set_num_q_heads(absl::GetFlag(FLAGS_q_heads));
  p.set_num_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  p.set_head_dim(absl::GetFlag(FLAGS_head_dim));
  p.set_block_size(absl::GetFlag(FLAGS_block_size));
  p.set_dtype(v1::DTYPE_BF16);
  setup.config.set_sparse_ratio(absl::GetFlag(FLAGS_sparse_ratio));
  setup.config.set_retrieval_stride(8);
  setup.blocks = absl::GetFlag(FLAGS_context) / p.block_size();
  setup.block_key_bytes = uint64_t{p.block_size()} * p.num_kv_heads() * p.head_dim() * 2;
  std::vector<size_t> thread_counts;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_copy_threads), ',')) {
    size_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n == 0) {
      std::fprintf(stderr, "node_data_path: --copy_threads: \"%s\" is not a count >= 1\n",
                   std::string(part).c_str());
      return 1;
    }
    thread_counts.push_back(n);
  }
  const uint64_t sequence_bytes = 2 * setup.block_key_bytes * setup.blocks * p.num_layers();
  std::printf(
      "node_data_path: %u layers x %u blocks of %.0f KiB K+V (%.2f GB stored), "
      "sparse_ratio %.2f, %u hardware threads\n",
      p.num_layers(), setup.blocks, 2 * setup.block_key_bytes / 1024.0, sequence_bytes / 1e9,
      setup.config.sparse_ratio(), std::thread::hardware_concurrency());

  std::unique_ptr<storage::BlockStore> store = storage::NewMemoryStore();
  std::string json = "{";
  double scoring_ms = 0;
  for (size_t i = 0; i < thread_counts.size(); ++i) {
    // Each node its own segment (a node's regions die with it, not with the segment), with room
    // for well over two retrievals' regions.
    server::TenantSegments segments(sequence_bytes, sequence_bytes);
    Check(segments.Obtain(kTenant).status(), "the tenant's segment");
    server::NodeOptions options;
    options.retrieval_threads = absl::GetFlag(FLAGS_retrieval_threads);
    options.copy_threads = thread_counts[i];
    options.shared_memory = &segments;
    absl::StatusOr<std::unique_ptr<server::StorageNode>> node =
        server::StorageNode::Create(store.get(), options);
    Check(node.status(), "StorageNode");
    if (i == 0) {
      const Clock::time_point start = Clock::now();
      Fill(**node, setup);
      std::printf("filled in %.1f s\n", Seconds(start));
    }
    v1::SealRequest seal;
    seal.set_sequence_id(kSequence);
    std::mt19937_64 rng(3);
    AddQueries(setup, rng, 8, seal.mutable_queries());
    Check((*node)->Seal(kTenant, seal).status(), "Seal");
    const int retrievals = absl::GetFlag(FLAGS_retrievals);
    uint64_t step = 0;  // a new node's sequence starts again at Seal
    if (i == 0) {
      scoring_ms = Run(**node, setup, false, retrievals, &step).ms;
      std::printf("%-22s %9.2f ms per retrieval\n", "scoring only (no data)", scoring_ms);
      json += absl::StrCat("\"scoring_ms\": ", scoring_ms);
    }
    const Measured m = Run(**node, setup, true, retrievals, &step);
    std::printf(
        "copy_threads %-9zu %9.2f ms per retrieval, %6.3f GB moved (%lu blocks, %lu as "
        "bytes), %6.2f GB/s over the data time\n",
        thread_counts[i], m.ms, m.gb_moved, static_cast<unsigned long>(m.blocks),
        static_cast<unsigned long>(m.as_bytes),
        m.gb_moved / std::max(1e-6, (m.ms - scoring_ms) / 1e3));
    json += absl::StrCat(", \"ms_copy_threads_", thread_counts[i], "\": ", m.ms,
                         ", \"gb_copy_threads_", thread_counts[i], "\": ", m.gb_moved);
  }
  const size_t probe = 512u << 20;
  const size_t most = *std::max_element(thread_counts.begin(), thread_counts.end());
  for (Pass pass : {Pass::kMemcpy, Pass::kStreaming, Pass::kMemset}) {
    const char* name = pass == Pass::kMemcpy      ? "memcpy"
                       : pass == Pass::kStreaming ? "streaming_copy"
                                                  : "memset";
    const double one = PassGbps(probe, 1, pass), many = PassGbps(probe, most, pass);
    std::printf("%-14s %5.1f GB/s on 1 thread, %5.1f GB/s on %zu\n", name, one, many, most);
    json +=
        absl::StrCat(", \"", name, "_gbps_1\": ", one, ", \"", name, "_gbps_", most, "\": ", many);
  }
  json += "}";
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace
}  // namespace kvstar::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvstar::bench::Main();
}
