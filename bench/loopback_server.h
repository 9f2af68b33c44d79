// LoopbackServer: the real KvStoreService over a given store, served by gRPC inside this process
// on 127.0.0.1 (a free port), with a stub to it. For benchmarks that must measure the service
// without a binary path or a second process. Shut down when destroyed.
#ifndef KVSTAR_BENCH_LOOPBACK_SERVER_H_
#define KVSTAR_BENCH_LOOPBACK_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "server/kvstore_service.h"
#include "storage/block_store.h"

namespace kvstar::bench {

class LoopbackServer {
 public:
  // Messages up to 64 MiB each way, on the server and on the stub's channel.
  static absl::StatusOr<std::unique_ptr<LoopbackServer>> Start(
      std::unique_ptr<storage::BlockStore> store, server::ServiceOptions options);
  ~LoopbackServer();

  const std::string& address() const { return address_; }
  v1::KvStore::Stub& stub() { return *stub_; }

 private:
  LoopbackServer() = default;

  std::unique_ptr<storage::BlockStore> store_;
  std::unique_ptr<server::KvStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::KvStore::Stub> stub_;
  std::string address_;
};

}  // namespace kvstar::bench

#endif  // KVSTAR_BENCH_LOOPBACK_SERVER_H_
