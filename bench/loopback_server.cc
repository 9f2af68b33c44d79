#include "bench/loopback_server.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvstar::bench {

absl::StatusOr<std::unique_ptr<LoopbackServer>> LoopbackServer::Start(
    std::unique_ptr<storage::BlockStore> store, server::ServiceOptions options) {
  constexpr int kMaxMessage = 64 << 20;
  std::unique_ptr<LoopbackServer> loopback(new LoopbackServer());
  loopback->store_ = std::move(store);
  absl::StatusOr<std::unique_ptr<server::KvStoreService>> service =
      server::KvStoreService::Create(loopback->store_.get(), options);
  if (!service.ok()) return service.status();
  loopback->service_ = *std::move(service);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(loopback->service_.get());
  builder.SetMaxReceiveMessageSize(kMaxMessage);
  builder.SetMaxSendMessageSize(kMaxMessage);
  loopback->server_ = builder.BuildAndStart();
  if (loopback->server_ == nullptr || port == 0) {
    return absl::InternalError("cannot start the in-process server on 127.0.0.1");
  }
  loopback->address_ = absl::StrCat("127.0.0.1:", port);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessage);
  args.SetMaxSendMessageSize(kMaxMessage);
  loopback->stub_ = v1::KvStore::NewStub(
      grpc::CreateCustomChannel(loopback->address_, grpc::InsecureChannelCredentials(), args));
  return loopback;
}

LoopbackServer::~LoopbackServer() {
  if (server_ != nullptr) server_->Shutdown();
}

}  // namespace kvstar::bench
