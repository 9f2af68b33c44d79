#include "server/flags.h"

#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Address to serve gRPC on, host:port (port 0 picks a free one). A sidecar listens on "
          "loopback; use 0.0.0.0:PORT for a remote storage node.");
ABSL_FLAG(std::string, backend, "rocksdb",
          "Block store backend: rocksdb (embedded, default), nfs (a POSIX/NFS directory) or "
          "memory (volatile: nothing survives the process).");
ABSL_FLAG(std::string, data_dir, "./kvstar-data", "Directory the backend keeps its data in.");
ABSL_FLAG(uint64_t, dram_budget_bytes, uint64_t{1} << 30,
          "Bytes of block data the DRAM tier caches in front of the backend (0 disables it).");
ABSL_FLAG(uint64_t, shared_memory_bytes, uint64_t{256} << 20,
          "Bytes of shared memory, over all tenants, through which co-located clients receive "
          "block bytes without copying them through gRPC (0 disables). Each tenant has its own "
          "segment (a memfd, nothing in /dev/shm), created when its first client asks for it.");
ABSL_FLAG(uint64_t, shared_memory_bytes_per_tenant, 0,
          "Size of one tenant's segment; a tenant gets less when the others' segments left less "
          "of --shared_memory_bytes, and none when they left nothing (its blocks then come as "
          "bytes). 0: --shared_memory_bytes split evenly over the tenants of "
          "--auth_tokens_file (all of it without authentication).");
ABSL_FLAG(std::string, shared_memory_socket, "",
          "Unix socket on which co-located clients receive their tenant's segment after their "
          "token is checked (advertised in GetServerInfo). \"@name\" is a name in the abstract "
          "namespace (nothing on disk; same network namespace only), anything else a file path. "
          "Empty: an abstract name of the server's own, @kvstar-<random>.");
ABSL_FLAG(int, worker_threads, 0,
          "Threads that run calls' store I/O and scoring (gRPC's callback API holds no thread "
          "for a waiting call; DropSequence has two threads of its own); 0 means max(16, 4 per "
          "hardware thread).");
ABSL_FLAG(uint64_t, stream_idle_timeout_ms, 30000,
          "A stream whose client sends nothing (PutBlocks) or reads nothing (Retrieve, "
          "GetBlocks) for this long is ended; 0 never ends one.");
ABSL_FLAG(uint64_t, max_open_streams, 1024,
          "Streaming calls (PutBlocks, Retrieve, GetBlocks) open at once on the node; more get "
          "RESOURCE_EXHAUSTED, and health reports NOT_SERVING while the limit is reached.");
ABSL_FLAG(uint64_t, max_open_streams_per_tenant, 512,
          "Streaming calls one tenant may hold open at once; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(uint64_t, max_inflight_put_bytes, uint64_t{512} << 20,
          "Bytes of PutBlocks messages received but not yet stored, over all streams; a message "
          "beyond it gets RESOURCE_EXHAUSTED, and health reports NOT_SERVING while it is reached. "
          "Bounds the memory that open put streams hold (must be >= --max_message_bytes).");
ABSL_FLAG(uint64_t, max_inflight_put_bytes_per_tenant, uint64_t{256} << 20,
          "The same bound for one tenant's streams (must be >= --max_message_bytes).");
ABSL_FLAG(int, retrieval_threads, 0,
          "Threads that score Seal and Retrieve; 0 means one per hardware thread. Lower it to "
          "leave cores to a co-located inference server.");
ABSL_FLAG(bool, segment_resident_blocks, false,
          "Keep each block a tenant puts in that tenant's shared-memory segment too, once one of "
          "its clients received the segment and while an eighth of it stays free, so that "
          "Retrieve names the block where it lies instead of copying it there. Size the segment "
          "(--shared_memory_bytes_per_tenant) for the tenant's blocks: they are held there on "
          "top of the store (the memory backend holds each twice).");
ABSL_FLAG(int, copy_threads, 0,
          "Threads that copy retrieved blocks into a tenant's shared-memory segment and zero a "
          "dropped sequence's regions; 0 means one per hardware thread. One moves about 5 GB/s, "
          "and a retrieval's new blocks can be over a GB.");
ABSL_FLAG(uint64_t, max_message_bytes, uint64_t{64} << 20,
          "Largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED.");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "File of \"<token> <tenant>\" lines. When set, every kvstar call needs "
          "\"authorization: Bearer <token>\" metadata and sees only its tenant's sequences; "
          "unset, every caller is tenant \"default\".");
ABSL_FLAG(std::string, admin_tenant, "",
          "With --auth_tokens_file: the tenant whose tokens see the whole node in Stats (every "
          "other tenant sees its own sequences and calls only). Empty: no tenant does.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain. With --tls_key_file the server speaks TLS only; unset, it "
          "speaks plaintext (fine on loopback; bearer tokens travel in clear off it).");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file's certificate.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle. When set (with TLS on), every client must present a certificate this "
          "CA signed (mutual TLS).");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port to serve Prometheus metrics on over HTTP (GET /metrics); port 0 picks a free "
          "one (logged). Empty: no metrics endpoint.");
ABSL_FLAG(std::string, port_file, "",
          "If set, the bound port is written to this file once the server is serving.");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn or error.");

namespace kvstar::server {

absl::StatusOr<ServerConfig> ParseServerFlags(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvstar storage node: stores offloaded KV blocks and serves the kvstar.v1.KvStore API.");
  absl::ParseCommandLine(argc, argv);
  ServerConfig config;
  config.listen_address = absl::GetFlag(FLAGS_listen);
  config.backend = absl::GetFlag(FLAGS_backend);
  config.data_dir = absl::GetFlag(FLAGS_data_dir);
  config.dram_budget_bytes = absl::GetFlag(FLAGS_dram_budget_bytes);
  config.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  config.retrieval_threads = absl::GetFlag(FLAGS_retrieval_threads);
  config.copy_threads = absl::GetFlag(FLAGS_copy_threads);
  config.segment_resident_blocks = absl::GetFlag(FLAGS_segment_resident_blocks);
  config.shared_memory_bytes = absl::GetFlag(FLAGS_shared_memory_bytes);
  config.shared_memory_bytes_per_tenant = absl::GetFlag(FLAGS_shared_memory_bytes_per_tenant);
  config.shared_memory_socket = absl::GetFlag(FLAGS_shared_memory_socket);
  config.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  config.port_file = absl::GetFlag(FLAGS_port_file);
  config.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  config.stream_idle_timeout_ms = absl::GetFlag(FLAGS_stream_idle_timeout_ms);
  config.max_open_streams = absl::GetFlag(FLAGS_max_open_streams);
  config.max_open_streams_per_tenant = absl::GetFlag(FLAGS_max_open_streams_per_tenant);
  config.max_inflight_put_bytes = absl::GetFlag(FLAGS_max_inflight_put_bytes);
  config.max_inflight_put_bytes_per_tenant = absl::GetFlag(FLAGS_max_inflight_put_bytes_per_tenant);
  config.auth_tokens_file = absl::GetFlag(FLAGS_auth_tokens_file);
  config.admin_tenant = absl::GetFlag(FLAGS_admin_tenant);
  config.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  config.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  config.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  config.log_level = absl::GetFlag(FLAGS_log_level);

  if (config.backend != "rocksdb" && config.backend != "nfs" && config.backend != "memory") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend is \"", config.backend, "\", must be rocksdb, nfs or memory"));
  }
  if (config.data_dir.empty()) return absl::InvalidArgumentError("--data_dir is empty");
  if (config.worker_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--worker_threads is ", config.worker_threads, ", must be >= 0"));
  }
  if (config.retrieval_threads < 0 || config.retrieval_threads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--retrieval_threads is ", config.retrieval_threads, ", must be in [0, 1024]"));
  }
  if (config.copy_threads < 0 || config.copy_threads > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--copy_threads is ", config.copy_threads, ", must be in [0, 1024]"));
  }
  if (config.worker_threads == 0) {
    config.worker_threads =
        static_cast<int>(std::max(16u, 4 * std::max(1u, std::thread::hardware_concurrency())));
  }
  if (config.max_open_streams == 0 || config.max_open_streams_per_tenant == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_open_streams is ", config.max_open_streams, " and --max_open_streams_per_tenant ",
        config.max_open_streams_per_tenant, "; both must be >= 1"));
  }
  // Below 1 MiB not even one block of a small model fits; gRPC's own ceiling is 2 GiB - 1.
  if (config.max_message_bytes < (uint64_t{1} << 20) ||
      config.max_message_bytes > (uint64_t{2} << 30) - 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_message_bytes is ", config.max_message_bytes, ", must be in [1 MiB, 2 GiB)"));
  }
  // A message is admitted whole: a bound below the largest message would refuse it forever.
  if (config.max_inflight_put_bytes < config.max_message_bytes ||
      config.max_inflight_put_bytes_per_tenant < config.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_inflight_put_bytes is ", config.max_inflight_put_bytes,
        " and --max_inflight_put_bytes_per_tenant ", config.max_inflight_put_bytes_per_tenant,
        "; both must be >= --max_message_bytes (", config.max_message_bytes, ")"));
  }
  return config;
}

}  // namespace kvstar::server
