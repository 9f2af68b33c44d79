// kvstar_demo: what an inference engine does with the client library, against a running storage
// node. It offloads one sequence's KV cache (a 28-layer model's 4K-token prompt), seals it with the
// last prompt queries, then runs decode steps: each layer acquires the slot table its attention
// would read, checks that every resident slot holds the bytes of its block, records the step's
// query and releases; every retrieval_stride steps the library retrieves in the background and
// loads only the newly selected blocks. It prints what the node says of the sequence
// (kvstar::Admin) and drops it. Exits non-zero on any mismatch or error.
//
//   kvstar_demo --server=127.0.0.1:50051 [--layers=28 --kv_heads=4 --head_dim=128 --tokens=4096]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "kvstar/admin.h"
#include "kvstar/client.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "Storage node address.");
ABSL_FLAG(std::string, sequence_id, "demo-sequence", "Id of the sequence to store.");
ABSL_FLAG(uint32_t, layers, 28, "Layers of the model.");
ABSL_FLAG(uint32_t, q_heads, 28, "Query heads per layer.");
ABSL_FLAG(uint32_t, kv_heads, 4, "KV heads per layer.");
ABSL_FLAG(uint32_t, head_dim, 128, "Channels per head.");
ABSL_FLAG(uint32_t, tokens, 4096, "Prompt tokens (a multiple of 128).");
ABSL_FLAG(uint32_t, steps, 24, "Decode steps to run after Seal.");
ABSL_FLAG(bool, keep, false, "Keep the sequence instead of dropping it at the end.");

namespace kvstar {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "FAILED %s: %s\n", what, status.ToString().c_str());
  return 1;
}

// Small finite bf16 values (|x| < 1/8) from a seed: a sign, a narrow exponent, random mantissa.
void FillBf16(uint64_t seed, std::string* bytes) {
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i + 1 < bytes->size(); i += 2) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint16_t bits =
        static_cast<uint16_t>(((state >> 33) & 0x807f) | 0x3c00 | (((state >> 45) & 0x3) << 7));
    std::memcpy(bytes->data() + i, &bits, 2);
  }
}

int Run() {
  ModelProfile profile;
  profile.num_layers = absl::GetFlag(FLAGS_layers);
  profile.num_q_heads = absl::GetFlag(FLAGS_q_heads);
  profile.num_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  profile.head_dim = absl::GetFlag(FLAGS_head_dim);
  profile.dtype = DType::kBf16;
  const uint32_t tokens = absl::GetFlag(FLAGS_tokens);
  if (tokens == 0 || tokens % profile.block_size != 0) {
    std::fprintf(stderr, "--tokens must be a positive multiple of %u\n", profile.block_size);
    return 2;
  }
  const uint32_t blocks = tokens / profile.block_size;
  const uint32_t steps = absl::GetFlag(FLAGS_steps);
  const uint32_t max_blocks = blocks + steps / profile.block_size + 2;
  const KvstarConfig config;  // the server's defaults
  const std::string id = absl::GetFlag(FLAGS_sequence_id);

  ClientOptions options;
  options.address = absl::GetFlag(FLAGS_server);
  // The demo checks slot bytes from the host, so it keeps the slots in host memory.
  options.backend = BackendKind::kHost;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  if (!client.ok()) return Fail("Connect", client.status());
  absl::StatusOr<std::unique_ptr<Admin>> admin = Admin::Connect(options);
  if (!admin.ok()) return Fail("Admin::Connect", admin.status());

  // One slot pool for every sequence of this client (here one), sized by the library. With a
  // single sequence the headroom must hold a whole new selection while the old one is read
  // (random queries change most of it): half the pool. Engines with many sequences, whose
  // retrievals fall on different steps, share a far smaller fraction.
  const SlotPoolOptions pool = SlotPoolFor(profile, config, max_blocks, 1, 0.5);
  if (absl::Status s = (*client)->CreateSlotPool(pool); !s.ok()) return Fail("CreateSlotPool", s);
  absl::StatusOr<Sequence*> created =
      (*client)->CreateSequence(id, profile, config, SequenceOptions{0, max_blocks});
  if (!created.ok()) return Fail("CreateSequence", created.status());
  Sequence* sequence = *created;
  std::printf("sequence %s: %u layers, %u/%u heads of %u, %u tokens = %u blocks per layer\n",
              id.c_str(), profile.num_layers, profile.num_q_heads, profile.num_kv_heads,
              profile.head_dim, tokens, blocks);
  std::printf("  knobs: sparse_ratio %.2f, retrieval_stride %u, init/local windows %u/%u blocks\n",
              config.sparse_ratio, config.retrieval_stride, config.init_window_sz,
              config.local_window_sz);
  std::printf("  slot pool: %llu slots of %.0f KiB (%.1f MiB; the whole cache is %.1f MiB)\n",
              static_cast<unsigned long long>(pool.num_slots), pool.slot_bytes / 1024.0,
              pool.num_slots * pool.slot_bytes / 1048576.0,
              2.0 * profile.num_layers * blocks * profile.block_key_bytes() / 1048576.0);

  // The prompt's blocks, kept here to check what lands in the slots.
  const uint64_t key_bytes = profile.block_key_bytes();
  std::vector<std::string> kv(uint64_t{profile.num_layers} * blocks);
  Clock::time_point start = Clock::now();
  for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
    for (uint32_t block = 0; block < blocks; ++block) {
      std::string& bytes = kv[uint64_t{layer} * blocks + block];
      bytes.resize(2 * key_bytes);
      FillBf16(uint64_t{layer} << 32 | block, &bytes);
      absl::Status s = sequence->Offload(layer, block, bytes.data(), bytes.data() + key_bytes,
                                         MemoryKind::kHost, nullptr);
      if (!s.ok()) return Fail("Offload", s);
    }
  }
  if (absl::Status s = sequence->Flush(); !s.ok()) return Fail("Flush", s);
  const double offload_s = SecondsSince(start);
  const double offloaded_mib = 2.0 * kv.size() * key_bytes / 1048576.0;
  std::printf("Offload: %zu blocks, %.1f MiB, durable on the node in %.2f s (%.2f GB/s)\n",
              kv.size(), offloaded_mib, offload_s, offloaded_mib * 1.048576e-3 / offload_s);

  std::string queries(
      uint64_t{profile.num_layers} * config.retrieval_stride * profile.query_bytes(), '\0');
  FillBf16(7, &queries);
  start = Clock::now();
  if (absl::Status s =
          sequence->Seal(queries.data(), config.retrieval_stride, MemoryKind::kHost, nullptr);
      !s.ok()) {
    return Fail("Seal", s);
  }
  std::printf("Seal: representations built and the first selection loaded in %.2f s\n",
              SecondsSince(start));

  std::string query(uint64_t{profile.num_layers} * profile.query_bytes(), '\0');
  uint64_t checked = 0;
  for (uint32_t step = 0; step < steps; ++step) {
    FillBf16(1000 + step, &query);
    uint32_t resident = 0;
    uint64_t selection_step = 0;
    for (uint32_t layer = 0; layer < profile.num_layers; ++layer) {
      absl::StatusOr<SlotTable> table = sequence->Acquire(layer, nullptr);
      if (!table.ok()) return Fail("Acquire", table.status());
      for (uint32_t i = 0; i < table->count; ++i) {
        const char* slot =
            static_cast<const char*>(table->slot_pool) + table->host_slots[i] * table->slot_bytes;
        const std::string& expected = kv[uint64_t{layer} * blocks + table->block_indices[i]];
        if (std::memcmp(slot, expected.data(), expected.size()) != 0) {
          std::fprintf(stderr, "FAILED: step %u layer %u: slot of block %u holds other bytes\n",
                       step, layer, table->block_indices[i]);
          return 1;
        }
        ++checked;
      }
      resident += table->count;
      selection_step = table->selection_step;
      absl::Status s = sequence->RecordQuery(layer, query.data() + layer * profile.query_bytes(),
                                             MemoryKind::kHost, nullptr);
      if (s.ok()) s = sequence->Release(layer, nullptr);
      if (!s.ok()) return Fail("RecordQuery/Release", s);
    }
    if (absl::Status s = (*client)->Step(); !s.ok()) {
      // A selection that found no free slot is dropped and the visible table stays: decoding
      // goes on; anything else is an error.
      if (s.code() != absl::StatusCode::kResourceExhausted) return Fail("Step", s);
      std::printf("  step %2u: %s\n", step, std::string(s.message()).c_str());
    }
    if (step % config.retrieval_stride == 0 || step + 1 == steps) {
      std::printf("  step %2u: %.1f resident blocks per layer, selection from step %llu\n", step,
                  static_cast<double>(resident) / profile.num_layers,
                  static_cast<unsigned long long>(selection_step));
    }
  }
  if (absl::Status s = (*client)->Flush(); !s.ok()) return Fail("Flush", s);
  const SequenceStats stats = sequence->stats();
  std::printf(
      "Decode: %u steps, %llu resident slots checked against their blocks; %llu selections "
      "published, %llu new blocks loaded (%.1f MiB), %llu already resident, max staleness %llu "
      "steps\n",
      steps, static_cast<unsigned long long>(checked),
      static_cast<unsigned long long>(stats.selections_published),
      static_cast<unsigned long long>(stats.blocks_loaded), stats.bytes_loaded / 1048576.0,
      static_cast<unsigned long long>(stats.blocks_already_resident),
      static_cast<unsigned long long>(stats.max_staleness_steps));

  absl::StatusOr<SequenceDescription> described = (*admin)->DescribeSequence(id);
  if (!described.ok()) return Fail("DescribeSequence", described.status());
  uint64_t stored = 0;
  for (uint32_t count : described->blocks_per_layer) stored += count;
  std::printf("Node: %llu blocks (%.1f MiB) stored, sealed %s\n",
              static_cast<unsigned long long>(stored), described->bytes / 1048576.0,
              described->sealed ? "yes" : "no");
  if (stored < kv.size()) {
    std::fprintf(stderr, "FAILED: the node holds %llu blocks, %zu were offloaded\n",
                 static_cast<unsigned long long>(stored), kv.size());
    return 1;
  }
  absl::StatusOr<NodeStatsInfo> node = (*admin)->Stats();
  if (!node.ok()) return Fail("Stats", node.status());
  std::printf(
      "Node stats (%s): %llu retrievals, %llu blocks scored, %llu sent, %llu skipped "
      "because the client held them\n",
      node->scope.c_str(), static_cast<unsigned long long>(node->retrievals),
      static_cast<unsigned long long>(node->blocks_scored),
      static_cast<unsigned long long>(node->blocks_sent),
      static_cast<unsigned long long>(node->blocks_skipped_held));
  if (!absl::GetFlag(FLAGS_keep)) {
    if (absl::Status s = (*client)->DropSequence(id); !s.ok()) return Fail("DropSequence", s);
    std::printf("DropSequence: %s removed from the node\n", id.c_str());
  }
  std::printf("demo OK\n");
  return 0;
}

}  // namespace
}  // namespace kvstar

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvstar::Run();
}
