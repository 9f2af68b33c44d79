// kvstarctl: asks a kvstar storage node what it holds and what it is doing, through the client
// library's Admin API.
//   kvstarctl [flags] health | stats | sequences [--details] | inspect ID | drop ID
// Human-readable by default, --json for one JSON object. Exit status 0 on success, 1 when the
// node answered an error (printed on stderr with its code), 2 for a bad command line.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvstar/admin.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "host:port of the storage node");
ABSL_FLAG(std::string, token, "",
          "bearer token (default: $KVSTAR_TOKEN); it decides which tenant's sequences you see");
ABSL_FLAG(bool, tls, false, "connect with TLS");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM CA bundle to trust (default: the system's roots)");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate, for mutual TLS");
ABSL_FLAG(std::string, tls_key_file, "", "PEM key of --tls_cert_file");
ABSL_FLAG(int, timeout_ms, 30000, "deadline of each call");
ABSL_FLAG(bool, json, false, "print one JSON object instead of text");
ABSL_FLAG(bool, details, false, "sequences: also read each one's stored blocks (slower)");

namespace kvstar {
namespace {

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// Ids can hold any byte: print them escaped so a line never breaks.
std::string Printable(const std::string& id) {
  std::string out;
  for (unsigned char c : id) {
    if (c < 0x20 || c == 0x7f || c == '\\') {
      out += absl::StrFormat("\\x%02x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string HumanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return unit == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", value, units[unit]);
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return "bf16";
    case DType::kFp16:
      return "fp16";
    case DType::kFp32:
      return "fp32";
  }
  return "unknown";
}

std::string ProfileText(const ModelProfile& p) {
  return absl::StrFormat("%u layers, %u q / %u kv heads, head_dim %u, %u-token blocks, %s",
                         p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim, p.block_size,
                         DTypeName(p.dtype));
}

std::string ProfileJson(const ModelProfile& p) {
  return absl::StrFormat(
      "{\"num_layers\":%u,\"num_q_heads\":%u,\"num_kv_heads\":%u,\"head_dim\":%u,"
      "\"block_size\":%u,\"dtype\":\"%s\"}",
      p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim, p.block_size, DTypeName(p.dtype));
}

const char* RepresentationName(uint32_t format) {
  // RepresentationFormat in kvstar.proto: 0 bf16 (the reference), 1 int8.
  return format == 1 ? "int8" : "bf16";
}

std::string ConfigText(const KvstarConfig& c) {
  return absl::StrFormat(
      "sparse_ratio %g, retrieval_stride %u, init/local windows %u/%u blocks, prune %g, "
      "merge %u, block_vote %s, representation %s",
      c.sparse_ratio, c.retrieval_stride, c.init_window_sz, c.local_window_sz,
      c.blk_repre_dim_prune_ratio, c.blk_repre_inner_token_merge, c.block_vote == 1 ? "max" : "sum",
      RepresentationName(c.representation_format));
}

std::string ConfigJson(const KvstarConfig& c) {
  return absl::StrFormat(
      "{\"sparse_ratio\":%g,\"retrieval_stride\":%u,\"init_window_sz\":%u,"
      "\"local_window_sz\":%u,\"blk_repre_dim_prune_ratio\":%g,"
      "\"blk_repre_inner_token_merge\":%u,\"block_vote\":%u,\"representation_format\":\"%s\"}",
      c.sparse_ratio, c.retrieval_stride, c.init_window_sz, c.local_window_sz,
      c.blk_repre_dim_prune_ratio, c.blk_repre_inner_token_merge, c.block_vote,
      RepresentationName(c.representation_format));
}

std::string SequenceJson(const SequenceDescription& s, bool with_blocks) {
  std::string json = absl::StrCat(
      "{\"sequence_id\":", JsonString(s.sequence_id), ",\"profile\":", ProfileJson(s.profile),
      ",\"config\":", ConfigJson(s.config), ",\"sealed\":", s.sealed ? "true" : "false",
      ",\"sealed_blocks\":", s.sealed_blocks);
  if (with_blocks) {
    absl::StrAppend(&json, ",\"blocks_per_layer\":[", absl::StrJoin(s.blocks_per_layer, ","),
                    "],\"bytes\":", s.bytes);
  }
  return json + "}";
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvstarctl: %s\n", status.ToString().c_str());
  return 1;
}

int Health(Admin& admin, bool json) {
  absl::StatusOr<std::string> health = admin.Health();
  if (!health.ok()) return Fail(health.status());
  if (json) {
    std::printf("{\"status\":%s}\n", JsonString(*health).c_str());
  } else {
    std::printf("%s\n", health->c_str());
  }
  return *health == "SERVING" ? 0 : 1;
}

int Stats(Admin& admin, bool json) {
  absl::StatusOr<NodeStatsInfo> stats = admin.Stats();
  if (!stats.ok()) return Fail(stats.status());
  const std::pair<const char*, uint64_t> counters[] = {
      {"sequences", stats->sequences},
      {"blocks_put", stats->blocks_put},
      {"blocks_got", stats->blocks_got},
      {"retrievals", stats->retrievals},
      {"blocks_scored", stats->blocks_scored},
      {"blocks_sent", stats->blocks_sent},
      {"blocks_skipped_held", stats->blocks_skipped_held},
      {"blocks_sent_shared", stats->blocks_sent_shared},
      {"corrupt_blocks", stats->corrupt_blocks},
      {"retrieve_micros", stats->retrieve_micros},
      {"retrieve_score_micros", stats->retrieve_score_micros},
      {"retrieve_wait_micros", stats->retrieve_wait_micros},
      {"retrieve_read_micros", stats->retrieve_read_micros},
      {"retrieve_copy_micros", stats->retrieve_copy_micros},
      {"retrieve_send_micros", stats->retrieve_send_micros}};
  if (json) {
    std::string out = absl::StrCat("{\"scope\":", JsonString(stats->scope));
    for (const auto& [name, value] : counters) absl::StrAppend(&out, ",\"", name, "\":", value);
    absl::StrAppend(&out, ",\"tiers\":[");
    for (size_t i = 0; i < stats->tiers.size(); ++i) {
      const TierInfo& t = stats->tiers[i];
      absl::StrAppend(&out, i ? "," : "", "{\"name\":", JsonString(t.name),
                      ",\"blocks\":", t.blocks, ",\"bytes\":", t.bytes,
                      ",\"budget_bytes\":", t.budget_bytes, ",\"hits\":", t.hits,
                      ",\"misses\":", t.misses, ",\"evictions\":", t.evictions,
                      ",\"reclaim_pending_bytes\":", t.reclaim_pending_bytes, "}");
    }
    std::printf("%s]}\n", out.c_str());
    return 0;
  }
  std::printf("scope: %s\n", stats->scope.c_str());
  for (const auto& [name, value] : counters) {
    std::printf("%-22s %llu\n", name, static_cast<unsigned long long>(value));
  }
  for (const TierInfo& t : stats->tiers) {
    const uint64_t reads = t.hits + t.misses;
    std::printf(
        "tier %-8s %llu blocks, %s%s, hit rate %s, %llu evictions, %s reclaim pending\n",
        t.name.c_str(), static_cast<unsigned long long>(t.blocks), HumanBytes(t.bytes).c_str(),
        t.budget_bytes ? absl::StrCat(" of ", HumanBytes(t.budget_bytes)).c_str() : "",
        reads ? absl::StrFormat("%.1f%%", 100.0 * t.hits / reads).c_str() : "-",
        static_cast<unsigned long long>(t.evictions), HumanBytes(t.reclaim_pending_bytes).c_str());
  }
  return 0;
}

int Sequences(Admin& admin, bool json, bool details) {
  absl::StatusOr<std::vector<SequenceDescription>> listed = admin.ListSequences();
  if (!listed.ok()) return Fail(listed.status());
  std::vector<SequenceDescription> sequences = *std::move(listed);
  if (details) {
    const absl::Time start = absl::Now();
    for (size_t i = 0; i < sequences.size(); ++i) {
      // Progress on stderr, so stdout stays the answer.
      std::fprintf(stderr, "\rkvstarctl: reading blocks of sequence %zu/%zu", i + 1,
                   sequences.size());
      absl::StatusOr<SequenceDescription> described =
          admin.DescribeSequence(sequences[i].sequence_id);
      if (described.ok()) {
        sequences[i] = *std::move(described);
      } else if (described.status().code() != absl::StatusCode::kNotFound) {
        std::fprintf(stderr, "\n");
        return Fail(described.status());
      }  // NOT_FOUND: dropped meanwhile; keep what the list said
    }
    if (!sequences.empty()) {
      std::fprintf(stderr, " (%.1f s)\n", absl::ToDoubleSeconds(absl::Now() - start));
    }
  }
  if (json) {
    std::string out = "{\"sequences\":[";
    for (size_t i = 0; i < sequences.size(); ++i) {
      absl::StrAppend(&out, i ? "," : "", SequenceJson(sequences[i], details));
    }
    std::printf("%s]}\n", out.c_str());
    return 0;
  }
  std::printf("%zu sequences\n", sequences.size());
  for (const SequenceDescription& s : sequences) {
    std::string line = absl::StrCat(Printable(s.sequence_id), "  ", s.profile.num_layers,
                                    " layers, ", s.sealed ? "sealed" : "not sealed");
    if (details) {
      uint64_t blocks = 0;
      for (uint32_t b : s.blocks_per_layer) blocks += b;
      absl::StrAppend(&line, ", ", blocks, " blocks, ", HumanBytes(s.bytes));
    }
    std::printf("%s\n", line.c_str());
  }
  return 0;
}

int Inspect(Admin& admin, const std::string& id, bool json) {
  absl::StatusOr<SequenceDescription> s = admin.DescribeSequence(id);
  if (!s.ok()) return Fail(s.status());
  if (json) {
    std::printf("%s\n", SequenceJson(*s, true).c_str());
    return 0;
  }
  std::printf("sequence  %s\n", Printable(s->sequence_id).c_str());
  std::printf("profile   %s\n", ProfileText(s->profile).c_str());
  std::printf("knobs     %s\n", ConfigText(s->config).c_str());
  std::printf(
      "sealed    %s\n",
      s->sealed ? absl::StrCat("yes, ", s->sealed_blocks, " blocks per layer").c_str() : "no");
  std::printf("stored    %s\n", HumanBytes(s->bytes).c_str());
  for (size_t layer = 0; layer < s->blocks_per_layer.size(); ++layer) {
    std::printf("  layer %3zu  %u blocks\n", layer, s->blocks_per_layer[layer]);
  }
  return 0;
}

int Drop(Admin& admin, const std::string& id, bool json) {
  const absl::Time start = absl::Now();
  if (!json) std::fprintf(stderr, "kvstarctl: dropping %s ...\n", Printable(id).c_str());
  absl::StatusOr<uint64_t> dropped = admin.DropSequence(id);
  if (!dropped.ok()) return Fail(dropped.status());
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  if (json) {
    std::printf("{\"sequence_id\":%s,\"blocks_dropped\":%llu,\"seconds\":%.3f}\n",
                JsonString(id).c_str(), static_cast<unsigned long long>(*dropped), seconds);
  } else {
    std::printf("dropped %s: %llu blocks in %.2f s\n", Printable(id).c_str(),
                static_cast<unsigned long long>(*dropped), seconds);
  }
  return 0;
}

std::string ReadFileOrDie(const std::string& flag, const std::string& path) {
  if (path.empty()) return "";
  FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    std::fprintf(stderr, "kvstarctl: %s %s: cannot read it\n", flag.c_str(), path.c_str());
    std::exit(2);
  }
  std::string bytes;
  char buffer[4096];
  for (size_t n; (n = std::fread(buffer, 1, sizeof(buffer), file)) > 0;) bytes.append(buffer, n);
  std::fclose(file);
  return bytes;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Asks a kvstar storage node what it holds.\n"
      "  kvstarctl [flags] health | stats | sequences [--details] | inspect ID | drop ID");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::vector<std::string> words(args.begin() + 1, args.end());
  const std::string command = words.empty() ? "" : words[0];
  const bool needs_id = command == "inspect" || command == "drop";
  const bool known =
      command == "health" || command == "stats" || command == "sequences" || needs_id;
  if (!known || words.size() != (needs_id ? 2u : 1u)) {
    std::fprintf(stderr,
                 "usage: kvstarctl [flags] health | stats | sequences [--details] | inspect ID | "
                 "drop ID   (--help lists the flags)\n");
    return 2;
  }
  ClientOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.bearer_token = absl::GetFlag(FLAGS_token);
  if (options.bearer_token.empty() && std::getenv("KVSTAR_TOKEN") != nullptr) {
    options.bearer_token = std::getenv("KVSTAR_TOKEN");
  }
  options.use_tls = absl::GetFlag(FLAGS_tls);
  options.tls_root_certs_pem = ReadFileOrDie("--tls_ca_file", absl::GetFlag(FLAGS_tls_ca_file));
  options.tls_cert_chain_pem = ReadFileOrDie("--tls_cert_file", absl::GetFlag(FLAGS_tls_cert_file));
  options.tls_private_key_pem = ReadFileOrDie("--tls_key_file", absl::GetFlag(FLAGS_tls_key_file));
  options.rpc_timeout_ms = absl::GetFlag(FLAGS_timeout_ms);
  absl::StatusOr<std::unique_ptr<Admin>> admin = Admin::Connect(options);
  if (!admin.ok()) {
    std::fprintf(stderr, "kvstarctl: %s\n", admin.status().ToString().c_str());
    return 2;
  }
  const bool json = absl::GetFlag(FLAGS_json);
  if (command == "health") return Health(**admin, json);
  if (command == "stats") return Stats(**admin, json);
  if (command == "sequences") return Sequences(**admin, json, absl::GetFlag(FLAGS_details));
  if (command == "inspect") return Inspect(**admin, words[1], json);
  return Drop(**admin, words[1], json);
}

}  // namespace
}  // namespace kvstar

int main(int argc, char** argv) { return kvstar::Main(argc, argv); }
